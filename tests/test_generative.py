"""Token-wise scores and scores per data owner, against exact identities (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.generative import (
    by_owner,
    completion_scores,
    expand_tokens,
    owner_index,
    prompt_mask,
    split_sequences,
    token_attribution,
    token_scores,
)

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


def test_prompt_mask_counts_the_completion_only() -> None:
    ids = torch.arange(8)[None].repeat(2, 1)  # sequences of 8 tokens: x = ids[:, :7]
    x, y = split_sequences(ids)
    assert torch.equal(x, ids[:, :-1]) and torch.equal(y, ids[:, 1:])
    masked = prompt_mask(y, 3)  # prompt = tokens 0, 1, 2: targets 1 and 2 are the prompt's
    assert masked[:, :2].eq(-100).all() and torch.equal(masked[:, 2:], y[:, 2:])
    assert masked[0, 2] == 3  # the first completion token is counted
    assert torch.equal(prompt_mask(y, 0), y) and torch.equal(prompt_mask(y, 1), y)
    per_row = prompt_mask(y, [2, 5])
    assert (per_row != -100).sum(1).tolist() == [6, 3]
    assert torch.equal(y, ids[:, 1:])  # a copy: the targets are left alone
    with pytest.raises(ValueError, match="leaves no completion"):
        prompt_mask(y, 9)
    with pytest.raises(ValueError, match="non-negative"):
        prompt_mask(y, [1, 2, 3])
    with pytest.raises(ValueError, match="token ids"):
        split_sequences(torch.zeros(3, 1, dtype=torch.long))


IF_KW = dict(method="if", dtype="float64", damping=0.1)


def test_an_empty_prompt_attributes_the_whole_sequence() -> None:
    model = TinyLM().to(D64)
    train = seqs(12, 1)
    ids = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(4))
    whole = etda.attribute(model, train, split_sequences(ids), **IF_KW).values
    for p in (0, 1):
        got = completion_scores(model, train, ids, prompt_len=p, **IF_KW).values
        np.testing.assert_array_equal(got, whole)
    one = completion_scores(model, train, ids[0], prompt_len=0, **IF_KW).values
    np.testing.assert_allclose(one, whole[:1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["graddot", "if"])
def test_masked_prompt_positions_never_change_a_score(method) -> None:
    model = TinyLM().to(D64)
    train = seqs(12, 1)
    x, y = seqs(3, 5)
    kw = IF_KW if method == "if" else dict(method=method, dtype="float64")
    got = completion_scores(model, train, (x, y), prompt_len=3, **kw).values
    other = y.clone()
    other[:, :2] = (other[:, :2] + 1) % 7  # other tokens at the prompt's (masked) targets
    np.testing.assert_array_equal(
        completion_scores(model, train, (x, other), prompt_len=3, **kw).values, got
    )
    # the completion's score is the mean of its tokens' scores, the prompt's never enter
    tokens = token_scores(model, train, (x, y), **kw)
    np.testing.assert_allclose(tokens[:, 2:].mean(1), got, rtol=1e-9, atol=1e-12)
    masked = token_scores(model, train, (x, prompt_mask(y, 3)), **kw)
    assert np.isnan(masked[:, :2]).all()
    np.testing.assert_allclose(masked[:, 2:], tokens[:, 2:], rtol=1e-9, atol=1e-12)


def test_trak_sequence_score_is_the_sum_of_its_token_scores() -> None:
    model = TinyLM().to(D64)
    train, test = seqs(12, 1), seqs(2, 6)
    kw = dict(method="trak", dtype="float64", projection="none", damping=0.1)
    whole = etda.attribute(model, train, test, **kw).values
    scores, counted = token_attribution(model, train, test, **kw)
    assert scores.shape == (8, 12) and scores.config["token_positions"] == 4 and counted.all()
    np.testing.assert_allclose(scores.values.reshape(2, 4, 12).sum(1), whole, rtol=1e-9)


def test_group_scores_are_sums_of_member_scores() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 30))
    owners = [f"book{i % 7}" for i in rng.permutation(30)]
    groups, names = owner_index(owners)
    sums, names2 = by_owner(values, owners)
    assert names == names2 and [names[g] for g in groups] == owners
    for g, name in enumerate(names):
        members = [i for i, o in enumerate(owners) if o == name]
        np.testing.assert_allclose(sums[:, g], values[:, members].sum(1), rtol=1e-12)
