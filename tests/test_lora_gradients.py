"""LoRA as a weight perturbation: ``LoRA(gradients="all")`` attributes the merged model.

Each LoRA member of ``gradients="all"`` must equal a hand-made reference: the adapters
merged by hand into a plain copy of the model (``W + scale * B @ A``, the fine-tuned
BatchNorm statistics copied), attributed with exact Grad-Dot. The default
(``gradients="adapters"``) must stay what it was: the adapter gradients' Grad-Dot.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

import etda
from etda.ensemble.base import BuildContext, member_seed
from etda.ensemble.lora import delta_ratios, merged_model
from etda.experiment import make_ensemble

D64 = torch.float64
N_TR, N_TE, D, H, C = 17, 5, 6, 7, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(D64)


def cnn() -> nn.Module:
    """(N, 1, 5, 5) -> Conv2d(1, 4, 3) -> BatchNorm -> ReLU -> Conv2d(4, 3, 3) -> pool -> (N, C)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, C, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(D64)


def data(shape: tuple[int, ...]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TR + N_TE, *shape, generator=g, dtype=D64)
    y = torch.randint(0, C, (N_TR + N_TE,), generator=g)
    return (x[:N_TR], y[:N_TR]), (x[N_TR:], y[N_TR:])


MLP_DATA, CNN_DATA = data((D,)), data((1, 5, 5))


def run(model, ens, d, method="graddot", **kw) -> etda.Scores:
    kw = {"projection": "identity", "dtype": "float64", "progress": False, **kw}
    return etda.attribute(model, train=d[0], test=d[1], method=method, ensemble=ens, **kw)


def assert_same(a, b, tol: float = 1e-10) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = float(np.abs(b).max())
    assert scale > 1e-8
    err = float(np.abs(a - b).max())
    assert err <= tol * scale, f"max abs difference {err:.3e} (scale {scale:.3e})"


def fine_tuned(lora: etda.LoRA, model: nn.Module, d, j: int) -> nn.Module:
    """Member j's fine-tuned adapter model (the wrapped model, adapters installed)."""
    ctx = BuildContext(d[0][0], d[0][1], etda.ClassificationTask(), 0, D64, False)
    return lora.adapter(model, ctx, member_seed(0, 0, j))[0]


def hand_merged(model: nn.Module, inner: nn.Module, scale: float) -> nn.Module:
    """A plain copy of ``model`` holding ``inner``'s weights with ``W + scale * B @ A``."""
    state = {
        k.replace(".base_layer", ""): v for k, v in inner.state_dict().items() if "lora_" not in k
    }
    named = dict(inner.named_modules())
    for name, m in named.items():
        if name.endswith("lora_A.default"):
            layer = name.removesuffix(".lora_A.default")
            a = m.weight.detach()
            b = named[f"{layer}.lora_B.default"].weight.detach()
            w = state[f"{layer}.weight"]
            delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            state[f"{layer}.weight"] = w + scale * delta.reshape(w.shape)
    plain = copy.deepcopy(model)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def adapter_graddot(inner: nn.Module, d) -> np.ndarray:
    """Exact Grad-Dot of the adapter parameters, one backward pass per example."""
    named = {n: p for n, p in inner.named_parameters() if "lora_" in n}

    def grads(x, y):
        rows = []
        for i in range(len(x)):
            loss = F.cross_entropy(inner(x[i : i + 1]), y[i : i + 1])
            g = torch.autograd.grad(loss, list(named.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows).detach()

    return (grads(*d[1]) @ grads(*d[0]).T).numpy()


# ------------------------------------------------------------------------ default mode


def test_default_mode_is_the_adapter_gradients():
    m, lora = mlp(), etda.LoRA(members=2, rank=2, epochs=1, lr=1e-2)
    default = run(m, lora, MLP_DATA).values
    explicit = etda.LoRA(members=2, rank=2, epochs=1, lr=1e-2, gradients="adapters")
    assert np.array_equal(default, run(m, explicit, MLP_DATA).values)
    inners = [fine_tuned(lora, m, MLP_DATA, j) for j in (0, 1)]
    expected = np.mean([adapter_graddot(inner, MLP_DATA) for inner in inners], 0)
    assert_same(default, expected, 1e-9)
    assert lora.key_parts() == ["r2e1"]  # the default names its configuration as before
    assert etda.LoRA(gradients="all", init_delta=0.1).key_parts() == ["r8e2", "init0.1", "grad-all"]


# ---------------------------------------------------------------------------- all mode


@pytest.mark.parametrize("make,d", [(mlp, MLP_DATA), (cnn, CNN_DATA)], ids=["linear", "conv"])
def test_all_mode_equals_the_hand_merged_model(make, d, tmp_path):
    m = make()
    lora = etda.LoRA(members=2, rank=2, epochs=1, lr=1e-2, gradients="all")
    got = run(m, lora, d, store=tmp_path)
    refs = [hand_merged(m, fine_tuned(lora, m, d, j), lora.alpha / lora.rank) for j in (0, 1)]
    expected = np.mean([run(r, None, d).values for r in refs], 0)
    assert_same(got.values, expected, 1e-9)
    n_params = sum(p.numel() for p in m.parameters())  # every parameter, not the adapters
    assert np.load(tmp_path / "member-000" / "train" / "g.npy").shape == (N_TR, n_params)
    # TracIn reads the merged epoch checkpoint (one epoch: the final weights, at the lr)
    tracin = run(m, lora, d, method="tracin").values
    assert_same(tracin, 1e-2 * expected, 1e-9)


class TiedLM(nn.Module):
    """Token ids (N, T) -> logits (N, T, V); the head's weight is the embedding's (GPT-2)."""

    def __init__(self, vocab: int = 11, width: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_merged_model_computes_what_the_adapter_model_computes():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (6, 4), generator=g)
    cases = [(mlp(), MLP_DATA[0][0]), (cnn(), CNN_DATA[0][0]), (TiedLM().to(D64), ids)]
    for model, x in cases:
        lora = etda.LoRA(rank=2, epochs=1, init_delta=0.3)  # a large update: merging shows
        ctx = BuildContext(x, x, etda.ClassificationTask(), 0, D64, False)
        peft_model = lora._peft_model(model, ctx, 1)
        peft_model.eval()
        merged = merged_model(peft_model)
        with torch.no_grad():
            assert_same(merged(x), peft_model.get_base_model()(x), 1e-12)
        assert all(p.requires_grad for p in merged.parameters())
    # the tied head got its own merged copy; the embedding kept its weights
    assert merged.head.weight is not merged.emb.weight
    assert torch.equal(merged.emb.weight, cases[2][0].emb.weight)


@pytest.mark.parametrize("make,d", [(mlp, MLP_DATA), (cnn, CNN_DATA)], ids=["linear", "conv"])
def test_adapter_mode_on_linear_and_conv_layers(make, d):
    m = make()
    lora = etda.LoRA(members=1, rank=2, epochs=1, lr=1e-2)
    inner = fine_tuned(lora, m, d, 0)
    suffix = ".lora_A.default"
    wrapped = {n.removesuffix(suffix) for n, _ in inner.named_modules() if n.endswith(suffix)}
    layers = {n for n, x in m.named_modules() if isinstance(x, nn.Linear | nn.Conv2d)}
    assert wrapped == layers  # peft wraps every Linear and Conv2d layer
    assert_same(run(m, lora, d).values, adapter_graddot(inner, d), 1e-9)


def test_model_storage_is_one_checkpoint_plus_adapters():
    m = cnn()
    n_base = sum(p.numel() for p in m.parameters())
    inner = fine_tuned(etda.LoRA(rank=2), m, CNN_DATA, 0)
    n_adapter = sum(p.numel() for n, p in inner.named_parameters() if "lora_" in n)
    assert 0 < n_adapter < n_base
    for gradients in ("adapters", "all"):
        lora = etda.LoRA(members=3, rank=2, epochs=1, gradients=gradients)
        costs = run(m, lora, CNN_DATA).costs
        assert costs.weights_bytes == (n_base + 3 * n_adapter) * 8, gradients


# ------------------------------------------------------------------------ delta ratios


def test_delta_ratio_is_recorded_per_layer():
    m = mlp()
    lora = etda.LoRA(members=2, rank=2, epochs=1, lr=1e-2)
    s = run(m, lora, MLP_DATA)
    for j, info in enumerate(s.config["members"]):
        inner = fine_tuned(lora, m, MLP_DATA, j)
        named = dict(inner.named_modules())
        assert set(info["delta_ratio"]) == {"0", "2"}
        for layer, ratio in info["delta_ratio"].items():
            a = named[f"{layer}.lora_A.default"].weight.detach()
            b = named[f"{layer}.lora_B.default"].weight.detach()
            w = named[f"{layer}.base_layer"].weight.detach()
            assert ratio > 0
            assert ratio == pytest.approx(float((2.0 * b @ a).norm() / w.norm()), rel=1e-12)
    json.dumps(s.config["members"])  # plain floats: the record saves as JSON


def test_init_delta_starts_every_layer_at_that_ratio():
    for make, d in ((mlp, MLP_DATA), (cnn, CNN_DATA)):
        lora = etda.LoRA(rank=2, epochs=1, init_delta=0.2)
        ctx = BuildContext(d[0][0], d[0][1], etda.ClassificationTask(), 0, D64, False)
        start = lora._peft_model(make(), ctx, 7).get_base_model()
        assert all(r == pytest.approx(0.2, rel=1e-12) for r in delta_ratios(start).values())
        s = run(make(), etda.LoRA(members=1, rank=2, epochs=1, init_delta=0.2), d)
        assert all(r > 0.1 for r in s.config["members"][0]["delta_ratio"].values())
    with pytest.raises(ValueError, match="init_delta must be >= 0"):
        etda.LoRA(init_delta=-0.1)


# ------------------------------------------------------------------------------ errors


def test_unknown_gradients_value_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA gradients 'bogus'.*'adapters'.*'all'"):
        etda.LoRA(gradients="bogus")
    with pytest.raises(ValueError, match="unknown LoRA gradients"):
        make_ensemble("lora", 2, lora_gradients="weights")
    with pytest.raises(ValueError, match="is an option of lora"):
        make_ensemble("dropout", 2, lora_gradients="all")


# --------------------------------------------------------------------------------- CLI

PACKAGE = {
    "lorapkg/__init__.py": "",
    "lorapkg/code.py": """
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def _make(n, seed):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

        def train():
            return _make(30, 1)

        def test():
            return _make(5, 2)
    """,
}


def test_cli_lora_gradients_option(tmp_path, monkeypatch):
    for name, text in PACKAGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from etda.cli import app

    refs = ["--model", "lorapkg.code:build", "--train", "lorapkg.code:train"]
    args = ["attribute", *refs, "--test", "lorapkg.code:test", "-m", "graddot", "-e", "lora"]
    args += ["-M", "2", "--rank", "2", "--lora-epochs", "1", "--no-progress", "--json"]
    try:
        result = CliRunner().invoke(app, [*args, "--lora-gradients", "all", "--out", "s"])
        assert result.exit_code == 0, result.output
        from lorapkg.code import build, test, train

        lora = etda.LoRA(members=2, rank=2, epochs=1, gradients="all")
        expected = etda.attribute(build(), train(), test(), method="graddot", ensemble=lora)
        np.testing.assert_allclose(etda.Scores.load(tmp_path / "s").values, expected.values)
        assert etda.Scores.load(tmp_path / "s").config["ensemble"]["gradients"] == "all"
        bad = CliRunner().invoke(app, [*args, "--lora-gradients", "bogus"])
        assert bad.exit_code != 0 and "unknown LoRA gradients" in bad.output
    finally:
        for mod in [m for m in sys.modules if m.startswith("lorapkg")]:
            del sys.modules[mod]
