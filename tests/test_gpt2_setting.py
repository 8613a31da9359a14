"""The GPT-2 text setting: a BPE tokenizer trained here, etda's GPT-2 wrapper, padding."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import needs_kjv

import etda
from etda.models.registry import create_model
from etda.task import IGNORE_INDEX, SequenceTask

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from etda.data.bpe import PAD, BPEVocabulary, train_bpe  # noqa: E402

D64 = torch.float64
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
] * 3


def test_bpe_training_is_deterministic() -> None:
    a, b = train_bpe(TEXTS, 300), train_bpe(list(TEXTS), 300)
    assert a == b
    vocab = BPEVocabulary(a)
    assert vocab.pad_id == 0 and vocab.tokenizer.id_to_token(0) == PAD
    assert len(vocab) <= 300 and train_bpe(TEXTS, 280) != a
    ids = vocab.encode(TEXTS[2])
    assert vocab.decode(ids) == TEXTS[2]
    assert vocab.decode(torch.cat([ids, torch.tensor([0, IGNORE_INDEX])])) == TEXTS[2]
    assert len(vocab.encode("light light light")) < len("light light light")  # merges learned


def tiny_gpt2(seed: int = 0):
    model = create_model(
        "gpt2", seed, vocab_size=19, n_positions=12, n_embd=8, n_layer=1, n_head=2, dropout=0.0
    )
    return model.to(D64).eval()


def padded(n: int, seed: int, length: int = 7, pad_to: int = 7):
    """Right-padded token windows of random real lengths in [3, length]: x, y (n, pad_to)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, pad_to + 1, dtype=torch.long)  # 0 = pad
    for i in range(n):
        real = int(torch.randint(3, length + 2, (1,), generator=g))
        ids[i, :real] = torch.randint(1, 19, (real,), generator=g)
    y = ids[:, 1:].clone()
    y[y == 0] = IGNORE_INDEX
    return ids[:, :-1].contiguous(), y


def test_gpt2_per_example_gradients_equal_a_backward_loop() -> None:
    from etda.features.featurize import FeatureSpec, Featurizer
    from etda.task import select_parameters

    model = tiny_gpt2()
    x, y = padded(6, 1)
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).all(1).sum() < 6
    names = select_parameters(model)
    spec = FeatureSpec("identity", target="loss", dtype="float64")
    fz = Featurizer(model, SequenceTask(), names, spec, (x, y))
    got = fz(x, y)["g"]
    rows = []
    for i in range(6):
        model.zero_grad()
        SequenceTask().loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        params = dict(model.named_parameters())
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["graddot", "trak", "if"])
def test_padding_never_changes_a_score(method) -> None:
    """More padding after the text gives the same scores (float64)."""
    model = tiny_gpt2(1)
    train, test = padded(10, 2), padded(3, 3)
    kw = dict(method=method, dtype="float64")
    if method != "graddot":
        kw.update(projection="none", damping=0.1)
    base = etda.attribute(model, train, test, **kw).values
    longer_train, longer_test = padded(10, 2, pad_to=11), padded(3, 3, pad_to=11)
    longer = etda.attribute(model, longer_train, longer_test, **kw).values
    np.testing.assert_allclose(longer, base, rtol=1e-9, atol=1e-12)


def test_a_padded_position_in_the_inputs_is_masked() -> None:
    """The wrapper masks attention at [PAD]: logits of real positions ignore what follows."""
    model = tiny_gpt2(2)
    x, _ = padded(4, 5)
    full = model(x)
    cut = model(x[:, :4])
    torch.testing.assert_close(full[:, :4], cut, rtol=1e-10, atol=1e-12)


@needs_kjv
def test_kjv_bpe_windows_and_the_cached_tokenizer(tmp_path) -> None:
    from etda.data.bpe import kjv_bpe, kjv_tokenizer
    from etda.data.text import load_kjv, window_owners

    b = kjv_bpe(n_train=40, n_test=6, seq_len=32, chars=150, vocab_size=300, cache_dir=tmp_path)
    assert b.x_train.shape == (40, 32) and b.y_test.shape == (6, 32)
    pad = b.pad_id
    # targets are -100 exactly where the next input is padding (or past the window)
    np.testing.assert_array_equal(b.y_train[:, :-1] == IGNORE_INDEX, b.x_train[:, 1:] == pad)
    text = load_kjv(tmp_path).text
    for i in (0, 17):
        passage = b.passage("train", i)
        assert text[b.train_offsets[i] :].startswith(passage)
    assert len(window_owners(b, "train", cache_dir=tmp_path)) == 40
    cached = tmp_path / "kjv-bpe-300.json"
    assert cached.is_file() and kjv_tokenizer(300, tmp_path) == b.tokenizer_json
    cached.write_text("{not json")  # a damaged cache is trained again, to the same tokenizer
    assert kjv_tokenizer(300, tmp_path) == b.tokenizer_json
    assert json.loads(cached.read_text())["tokenizer"] == json.loads(b.tokenizer_json)
    again = kjv_bpe(n_train=40, n_test=6, seq_len=32, chars=150, vocab_size=300, cache_dir=tmp_path)
    assert again.fingerprint() == b.fingerprint()


@needs_kjv
def test_the_gpt2_setting_trains_and_attributes() -> None:
    import functools

    from etda.data.bpe import kjv_bpe
    from etda.settings import get_setting
    from etda.train import TrainRecipe

    base = get_setting("kjv-gpt2")
    data_fn = functools.partial(kjv_bpe, n_train=48, n_test=4, seq_len=32, chars=120)
    recipe = dataclasses.replace(base.recipe, epochs=1)
    setting = dataclasses.replace(base, data_fn=data_fn, recipe=recipe)
    assert isinstance(recipe, TrainRecipe) and recipe.optimizer == "adamw"
    d = setting.data()
    result = setting.train(0)
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    out = setting.output(result.model, d.x_test, d.y_test)
    assert out.shape == (4,) and torch.isfinite(out).all() and (out < 0).all()
    scores = etda.attribute(
        result.model, train=(d.x_train, d.y_train), test=(d.x_test, d.y_test), method="trak"
    )
    assert scores.values.shape == (4, 48) and np.isfinite(scores.values).all()


def _tiny_gpt2_setting():
    import functools

    from etda.data.bpe import kjv_bpe
    from etda.settings import Setting
    from etda.train import TrainRecipe

    return Setting(
        name="kjv-gpt2-tiny",
        model_name="gpt2",
        model_kwargs={
            "vocab_size": 300,
            "n_positions": 24,
            "n_embd": 16,
            "n_layer": 1,
            "n_head": 2,
            "dropout": 0.1,
            "pad_id": 0,
        },
        recipe=TrainRecipe(optimizer="adamw", lr=1e-2, weight_decay=0.01, epochs=2, batch_size=16),
        data_fn=functools.partial(
            kjv_bpe, n_train=40, n_test=6, seq_len=24, chars=30, vocab_size=300
        ),
        task="sequence",
    )


@needs_kjv
def test_token_explanations_and_prompts_of_a_bpe_model(tmp_path, monkeypatch) -> None:
    """``etda explain --tokens/--prompt`` on a GPT-2 with BPE tokens and padded windows."""
    from typer.testing import CliRunner

    from etda.cli import app
    from etda.explain import explain, explain_tokens
    from etda.settings import SETTINGS

    tiny = _tiny_gpt2_setting()
    monkeypatch.setitem(SETTINGS, tiny.name, tiny)
    data = tiny.data()
    padded_test = int(np.flatnonzero((data.y_test == IGNORE_INDEX).any(1))[0])
    kw = dict(method="graddot", model_dir=tmp_path)
    te = explain_tokens(tiny, padded_test, per_token=2, **kw)
    real = int((data.y_test[padded_test] != IGNORE_INDEX).sum())
    assert len(te.tokens) == real == te.values.shape[0] and np.isfinite(te.values).all()
    assert te.context + "".join(te.tokens) == data.passage("test", padded_test)
    assert te.top[0][0].text == data.passage("train", te.top[0][0].index)
    # a prompt and a completion counted in tokens; the prompt's targets masked
    e = explain(tiny, prompt="And God said", completion=", Let there be light", top_k=2, **kw)
    n_prompt = len(data.vocab.encode("And God said"))
    n_all = len(data.vocab.encode("And God said, Let there be light"))
    assert e.info["counted"] == n_all - n_prompt
    r = CliRunner().invoke(
        app,
        [
            "explain",
            "-s",
            tiny.name,
            "--model-dir",
            str(tmp_path),
            "-m",
            "graddot",
            "--prompt",
            "In the beginning",
            "--length",
            "30",
            "--tokens",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "top proponent" in r.output
