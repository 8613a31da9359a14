"""Token-wise scores and scores per data owner, against exact identities (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.generative import by_owner, expand_tokens, token_scores

D64 = torch.float64


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids)))
        return self.out(h.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None])


def seqs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (n, 5), generator=g)
    return ids[:, :4], ids[:, 1:]


@pytest.mark.parametrize("method", ["graddot", "if"])
def test_mean_of_token_scores_is_the_sequence_score(method) -> None:
    model = TinyLM().to(D64)
    train, (xt, yt) = seqs(12, 1), seqs(3, 2)
    yt = yt.clone()
    yt[2, 3] = -100  # one padded position
    kw = (
        dict(method=method, dtype="float64", damping=0.1)
        if method == "if"
        else dict(method=method, dtype="float64")
    )
    tokens = token_scores(model, train, (xt, yt), **kw)
    assert tokens.shape == (3, 4, 12)
    assert np.isnan(tokens[2, 3]).all() and np.isfinite(tokens[:2]).all()
    whole = etda.attribute(model, train, (xt, yt), **kw).values
    np.testing.assert_allclose(np.nanmean(tokens, axis=1), whole, rtol=1e-9, atol=1e-12)


def test_expanded_copies_count_one_token_each() -> None:
    x, y = seqs(2, 3)
    xe, ye, counted = expand_tokens(x, y)
    assert xe.shape == (8, 4) and ye.shape == (8, 4) and counted.all()
    assert ((ye != -100).sum(1) == 1).all()
    assert torch.equal(ye[5, 1], y[1, 1]) and torch.equal(xe[5], x[1])


def test_scores_per_owner() -> None:
    values = np.arange(12.0).reshape(2, 6)
    owners = ["b", "a", "b", "c", "a", "b"]
    total, names = by_owner(values, owners)
    assert names == ["b", "a", "c"]
    np.testing.assert_array_equal(total, [[0 + 2 + 5, 1 + 4, 3], [6 + 8 + 11, 7 + 10, 9]])
    mean, _ = by_owner(values, owners, reduce="mean")
    np.testing.assert_allclose(mean, total / [3, 2, 1])
    three_d, _ = by_owner(np.stack([values, values]), owners)  # token-wise scores too
    np.testing.assert_array_equal(three_d[1], total)
    with pytest.raises(ValueError, match="owners for"):
        by_owner(values, owners[:3])
