"""``etda explain``: stable under a seed, generated passages, image grids, CLI."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from conftest import needs_kjv
from typer.testing import CliRunner

from etda.cli import app
from etda.data.text import kjv
from etda.explain import explain, render_png, render_text
from etda.settings import SETTINGS, Setting, get_setting
from etda.train import TrainRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_TEXT = Setting(
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


@needs_kjv
def test_explain_text_is_stable_under_a_seed(tmp_path):
    kw = dict(top_k=3, model_dir=tmp_path, method="trak", ensemble="dropout", members=2)
    a = explain(TINY_TEXT, 2, **kw)
    b = explain(TINY_TEXT, 2, **kw)  # second call: model loaded from the cache
    assert render_text(a, costs=False) == render_text(b, costs=False)
    text = render_text(a)
    data = TINY_TEXT.data()
    assert data.passage("test", 2) in text.replace(" ⏎ ", "\n")
    assert len(a.proponents) == len(a.opponents) == 3 and a.n_members == 2
    assert a.proponents[0].score >= a.proponents[-1].score >= a.opponents[-1].score
    assert a.proponents[0].text == data.passage("train", a.proponents[0].index)
    assert a.proponents[0].label[0].isalnum() and ":" in a.proponents[0].label  # a verse ref
    c = explain(TINY_TEXT, 2, **{**kw, "seed": 1})  # other masks and projection
    assert c.scores.values.tolist() != a.scores.values.tolist()


@needs_kjv
def test_explain_generated_continuation(tmp_path):
    kw = dict(prompt="In the beginning", length=8, top_k=2, model_dir=tmp_path, method="gradcos")
    a = explain(TINY_TEXT, **kw)
    b = explain(TINY_TEXT, **kw)
    assert a.generated == b.generated and a.generated.startswith("In the beginning")
    assert len(a.generated) == 16 + 8 and a.test.text == a.generated[-17:]
    assert render_text(a, costs=False) == render_text(b, costs=False)
    greedy = explain(TINY_TEXT, **{**kw, "temperature": 0.0})
    assert greedy.generated.startswith("In the beginning")
    with pytest.raises(ValueError, match="shorter than one window"):
        explain(TINY_TEXT, prompt="In", length=3, model_dir=tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        explain(TINY_TEXT, prompt="In the beginning §", model_dir=tmp_path)


def test_explain_image_setting_png(tmp_path):
    s = get_setting("digits-logreg")
    s = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=2))
    e = explain(s, 5, top_k=3, method="graddot", model_dir=tmp_path)
    assert e.test.x is not None and e.test.x.shape == (1, 8, 8)
    assert "margin" in render_text(e) and e.test.label == str(int(s.data().y_test[5]))
    path = render_png(e, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a sequence setting"):
        explain(s, 0, prompt="x", model_dir=tmp_path)
    with pytest.raises(ValueError, match="test must be an index"):
        explain(s, 10_000, model_dir=tmp_path)


@needs_kjv
def test_cli_explain(tmp_path, monkeypatch):
    monkeypatch.setitem(SETTINGS, TINY_TEXT.name, TINY_TEXT)
    args = ["explain", "--setting", "kjv-tiny", "--test", "1", "--top-k", "2"]
    args += ["--model-dir", str(tmp_path), "--method", "graddot", "--threads", "1"]
    r1 = CliRunner().invoke(app, args)
    assert r1.exit_code == 0, r1.output
    assert "top 2 proponents" in r1.output and "train #" in r1.output
    r2 = CliRunner().invoke(app, args)
    strip = [line for line in r1.output.splitlines() if not line.startswith("costs")]
    assert strip == [line for line in r2.output.splitlines() if not line.startswith("costs")]
    bad = CliRunner().invoke(app, [*args, "--prompt", "In", "--length", "2"])
    assert bad.exit_code == 2 and "shorter than one window" in bad.output
