"""``etda explain --tokens / --prompt --completion / --by book``: token-wise scores, prompt
masking and scores per data owner on a tiny text setting, end to end."""

from __future__ import annotations

import functools
import textwrap

import numpy as np
import pytest
from conftest import needs_kjv
from typer.testing import CliRunner

from etda.cli import app
from etda.data.text import kjv, load_kjv, ref_owner, window_owners
from etda.explain import (
    explain,
    explain_tokens,
    render_html,
    render_tokens,
    render_tokens_png,
    setting_owners,
    top_owners,
)
from etda.generative import by_owner
from etda.settings import SETTINGS, Setting
from etda.train import TrainRecipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Setting(
    name="kjv-tiny",
    model_name="char-transformer",
    model_kwargs={
        "vocab_size": 63,
        "block_size": 16,
        "d_model": 16,
        "n_layer": 1,
        "n_head": 2,
        "dropout": 0.1,
    },
    recipe=TrainRecipe(optimizer="adam", lr=1e-2, weight_decay=0.0, epochs=2, batch_size=16),
    data_fn=functools.partial(kjv, n_train=48, n_test=6, seq_len=16, seed=0),
    task="sequence",
    description="tiny text setting for tests",
)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(SETTINGS, TINY.name, TINY)
    return ["explain", "-s", TINY.name, "--model-dir", str(tmp_path), "--threads", "1"]


def test_owners_are_the_books_of_the_window_starts() -> None:
    assert ref_owner("1Sm3:4") == "1Sm" and ref_owner("Ge1:3", "chapter") == "Ge1"
    with pytest.raises(ValueError, match="level must be"):
        ref_owner("Ge1:3", "page")


@needs_kjv
def test_window_owners_of_the_tiny_setting() -> None:
    data, corpus = TINY.data(), load_kjv()
    books = window_owners(data)
    assert len(books) == data.n_train and setting_owners(TINY) == books
    assert books[5] == ref_owner(corpus.ref_at(data.train_offsets[5]))
    assert window_owners(data, "test", "verse")[0] == corpus.ref_at(data.test_offsets[0])
    with pytest.raises(ValueError, match="no verse references"):
        setting_owners("digits-logreg")


@needs_kjv
def test_token_explanation_and_heat_maps(tmp_path) -> None:
    te = explain_tokens(TINY, 2, per_token=2, method="graddot", model_dir=tmp_path)
    data = TINY.data()
    assert te.context + "".join(te.tokens) == data.passage("test", 2)
    assert te.values.shape == (16, 48) and all(len(top) == 2 for top in te.top)
    best = int(np.argmax(te.values[4]))
    assert te.top[4][0].index == best and te.top[4][0].text == data.passage("train", best)
    np.testing.assert_allclose(te.top_scores, te.values.max(1))
    text = render_tokens(te)
    assert "top proponent" in text and f"#{best}" in text
    page = render_html(te, tmp_path / "t.html").read_text()
    assert (
        page.startswith("<!doctype html>") and page.count('title="+') + page.count('title="-') == 16
    )
    assert "<script" not in page and "http" not in page  # self-contained
    png = render_tokens_png(te, tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@needs_kjv
def test_completion_masks_the_prompt(tmp_path) -> None:
    kw = dict(method="graddot", model_dir=tmp_path, top_k=2)
    data = TINY.data()
    passage = data.passage("test", 3)
    # an empty prompt: the completion is the whole passage, attributed as the test example
    whole = explain(TINY, prompt="", completion=passage, **kw)
    np.testing.assert_array_equal(whole.scores.values, explain(TINY, 3, **kw).scores.values)
    e = explain(TINY, prompt="In the", completion=" beginning God", **kw)
    assert e.test.text == "the beginning God" and e.info["counted"] == 14
    te = explain_tokens(TINY, prompt="In the", completion=" beginning God", **kw_tokens(kw))
    assert te.top[0] == [] == te.top[1] and np.isnan(te.values[:2]).all()
    np.testing.assert_allclose(np.nanmean(te.values, 0), e.scores.values[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="completion is empty"):
        explain(TINY, prompt="In", completion="", model_dir=tmp_path)


def kw_tokens(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "top_k"}


@needs_kjv
def test_cli_tokens_prompt_and_books(tiny, tmp_path) -> None:
    runner = CliRunner()
    html, png = tmp_path / "map.html", tmp_path / "map.png"
    args = [*tiny, "-m", "graddot", "-t", "1", "--tokens", "--per-token", "2"]
    r = runner.invoke(app, [*args, "--html", str(html), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert "top proponent" in r.output and html.stat().st_size > 1000 and png.exists()
    r = runner.invoke(app, [*tiny, "-m", "graddot", "--prompt", "In the", "--completion", " God"])
    assert r.exit_code == 0, r.output
    assert "completion: 'In the God'" in r.output and "completion's 4 characters" in r.output
    r = runner.invoke(app, [*tiny, "-m", "graddot", "-t", "1", "--by", "book", "--top-k", "3"])
    assert r.exit_code == 0, r.output
    e = explain(TINY, 1, method="graddot", model_dir=tmp_path, top_k=3)
    top, _ = top_owners(e.scores.values[0], setting_owners(TINY), 3)
    sums, names = by_owner(e.scores.values, setting_owners(TINY))
    assert top[0].score == pytest.approx(sums[0].max()) and top[0].owner == names[sums[0].argmax()]
    assert f"{top[0].score:+.4g}  {top[0].owner} (" in r.output


def flat(text: str) -> str:
    """Output without rich's line wrapping and box characters."""
    return " ".join(text.replace("│", " ").split())


def test_cli_errors_are_clear(tiny) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["explain", "-s", "digits-logreg", "--tokens"])
    assert r.exit_code == 2 and "is not a sequence setting" in flat(r.output)
    r = runner.invoke(app, [*tiny, "--html", "x.html"])
    assert r.exit_code == 2 and "add --tokens" in flat(r.output)
    r = runner.invoke(app, [*tiny, "--by", "shelf"])
    assert r.exit_code == 2 and "unknown owner level" in flat(r.output)
    r = runner.invoke(app, ["explain", "-s", "digits-logreg", "--by", "book"])
    assert r.exit_code == 2 and "has no verse references" in flat(r.output)


USER_LM = """
    import torch
    from torch import nn

    def _seqs(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 5, (n, 6), generator=g)
        return ids[:, :5], ids[:, 1:]

    def train():
        return _seqs(10, 1)

    def test():
        return _seqs(2, 2)

    def decode(ids):
        return "".join("abcde"[int(i)] for i in ids.reshape(-1))

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
"""


def test_cli_tokens_of_saved_user_scores(tmp_path, monkeypatch) -> None:
    from etda.generative import token_attribution

    (tmp_path / "lm.py").write_text(textwrap.dedent(USER_LM))
    monkeypatch.syspath_prepend(str(tmp_path))
    import lm

    scores, _ = token_attribution(lm.build(), lm.train(), lm.test(), method="graddot")
    scores.save(tmp_path / "scores")
    args = ["explain", "--scores", str(tmp_path / "scores"), "--tokens", "-t", "1"]
    refs = ["--train", "lm:train", "--test-data", "lm:test", "--decode", "lm:decode"]
    r = CliRunner().invoke(app, [*args, *refs, "--html", str(tmp_path / "u.html")])
    assert r.exit_code == 0, r.output
    best = int(np.argmax(scores.values[5 + 2]))  # test 1, token 2
    assert f"#{best}" in r.output and (tmp_path / "u.html").exists()
    bad = CliRunner().invoke(app, [*args, "--train", "lm:train", "--test-data", "lm:train"])
    assert bad.exit_code == 2 and "token-wise scores of 10 test sequences" in flat(bad.output)
