"""The character transformer: structure, exact per-example gradients, every method and
ensemble through ``etda.attribute``, LoRA adapters, and the kjv-transformer setting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import needs_kjv
from torch import nn

import etda
from etda.config import AttributeConfig
from etda.engine import resolve
from etda.ensemble.base import ENSEMBLES, BuildContext
from etda.ensemble.dropout import MaskedDropout, install_masks
from etda.features.capture import set_example_index
from etda.methods import get_method
from etda.models import create_model
from etda.models.transformer import CharTransformer
from etda.settings import get_setting
from etda.task import SequenceTask
from etda.train import TrainRecipe, train_model

D64 = torch.float64
V, T, N_TR, N_TE = 5, 6, 12, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, V, (N_TR + N_TE, T + 1), generator=g)
    x, y = seqs[:, :-1], seqs[:, 1:]
    return (x[:N_TR], y[:N_TR]), (x[N_TR:], y[N_TR:])


def _tiny(seed: int = 0, dropout: float = 0.2) -> CharTransformer:
    return create_model(
        "char-transformer",
        seed,
        vocab_size=V,
        block_size=T,
        d_model=8,
        n_layer=1,
        n_head=2,
        dropout=dropout,
    )


@pytest.fixture(scope="module")
def trained(tokens):
    (x, y), _ = tokens
    recipe = TrainRecipe(optimizer="adam", lr=1e-2, weight_decay=0.0, epochs=3, batch_size=4)
    out = []
    for seed in (0, 1):
        r = train_model(_tiny(seed), x, y, recipe, seed, checkpoint_epochs=[1, 2, 3])
        out.append(r)
    return out


def test_structure_and_causality():
    m = _tiny().eval()
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.out"} <= set(
        names
    )
    assert "head" in names and not any(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 2
    assert m.head.weight.data_ptr() != m.tok.weight.data_ptr()  # untied
    x = torch.randint(0, V, (2, T))
    out = m(x)
    assert out.shape == (2, T, V)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % V  # changing the last token changes no earlier output
    torch.testing.assert_close(m(x2)[:, :-1], out[:, :-1])
    torch.testing.assert_close(m(x.double()), out)  # float token ids are accepted
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, T + 1, dtype=torch.long))


def test_generate_greedy_and_seeded():
    m = _tiny()
    prompt = torch.tensor([1, 2])
    a = m.generate(prompt, 9)
    assert a.shape == (11,) and torch.equal(a[:2], prompt) and torch.equal(a, m.generate(prompt, 9))
    s1 = m.generate(prompt, 9, 1.0, torch.Generator().manual_seed(3))
    s2 = m.generate(prompt, 9, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and m.training  # mode restored


def _loop_grads(model: nn.Module, x, y) -> torch.Tensor:
    """Per-example gradients of the mean token loss by single backward passes, (n, p)."""
    task = SequenceTask()
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        task.loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("use_hooks", [True, False])
def test_per_example_gradients_equal_loop(tokens, use_hooks):
    (x, y), (xt, yt) = tokens
    model = _tiny().to(D64).eval()
    scores = etda.attribute(
        model,
        (x, y),
        (xt, yt),
        "graddot",
        projection="identity",
        task=SequenceTask(),
        dtype="float64",
        chunk_size=5,  # several chunks
        use_hooks=use_hooks,
    )
    g_tr, g_te = _loop_grads(model, x, y), _loop_grads(model, xt, yt)
    np.testing.assert_allclose(scores.values, (g_te @ g_tr.T).numpy(), rtol=1e-10, atol=1e-14)
    # the exact kernel without projection (hooked factors + flat rest) agrees as well
    exact = etda.attribute(
        model, (x, y), (xt, yt), "graddot", projection="none", dtype="float64"
    )  # task inferred from 2-D targets
    assert exact.config["task"] == "sequence"
    np.testing.assert_allclose(exact.values, scores.values, rtol=1e-10, atol=1e-14)


def test_trak_output_gradients_and_q(tokens):
    """TRAK differentiates the sequence log-likelihood; Q = 1 - exp(mean token log-prob)."""
    (x, y), (xt, yt) = tokens
    model = _tiny().to(D64).eval()
    s = etda.attribute(
        model, (x, y), (xt, yt), "trak", projection="identity", dtype="float64", damping=1e-3
    )
    logp = torch.log_softmax(model(x), -1).gather(-1, y[..., None])[..., 0]
    q = 1 - logp.mean(1).exp()

    def out_grads(xs, ys):
        rows = []
        for i in range(xs.shape[0]):
            model.zero_grad()
            SequenceTask().output(model(xs[i : i + 1]), ys[i : i + 1]).sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return torch.stack(rows).detach()

    phi, phi_t = out_grads(x, y), out_grads(xt, yt)
    k = phi.T @ phi + 1e-3 * torch.eye(phi.shape[1], dtype=D64)
    ref = phi_t @ torch.linalg.solve(k, phi.T) * q.detach()[None, :]
    np.testing.assert_allclose(s.values, ref.numpy(), rtol=1e-6, atol=1e-9)


METHODS = ["graddot", "gradcos", "tracin", "if", "trak"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_every_ensemble(tokens, trained, method):
    (x, y), test = tokens
    models = [r.model for r in trained]
    ensembles = {
        "independent": (None, models),
        "dropout": (etda.Dropout(2), models[:1]),
        "dropout-per-example": (etda.Dropout(2, mode="per-example"), models[:1]),
        "lora": (etda.LoRA(2, rank=2, epochs=1, batch_size=4), models[:1]),
        "hybrid 2x2 dropout": (etda.Dropout(2), models),
        "hybrid 2x2 lora": (etda.LoRA(2, rank=2, epochs=1, batch_size=4), models),
    }
    if method == "trak":
        ensembles["dropout-forward"] = (etda.Dropout(3, forward_only=True), models[:1])
    for name, (ens, ms) in ensembles.items():
        kw: dict = {}
        if method == "tracin" and not isinstance(ens, etda.LoRA):
            kw = {
                "checkpoints": [r.checkpoints for r in trained[: len(ms)]],
                "checkpoint_lrs": trained[0].checkpoint_lrs,
            }
        s = etda.attribute(ms, (x, y), test, method, ens, task=SequenceTask(), proj_dim=32, **kw)
        assert s.values.shape == (N_TE, N_TR), name
        assert np.isfinite(s.values).all(), name
        assert len(s.config["members"]) == (ens.size(len(ms)) if ens else len(ms)), name


def _q(model: nn.Module, x, y) -> torch.Tensor:
    """TRAK's Q of a member, float64 (per-example masks keyed by training positions)."""
    set_example_index(model, torch.arange(x.shape[0]))
    with torch.no_grad():
        return SequenceTask().q(model.eval()(x), y).double()


def _reference(method, models, ens, train, test, **kw) -> np.ndarray:
    """The documented combine rule applied to the members one at a time.

    Members come from the ensemble itself (``plan.ensemble.members``: the same seeds, masks
    and adapters the run builds). Each member alone is attributed with ``ensemble=None``;
    Grad-Dot averages the member scores; TRAK averages the kernel terms
    ``K_m = tau_m / Q_m`` and the Q terms separately and multiplies them (forward-only
    members share the unmasked model's kernel and differ only in their ``q_model``)."""
    cfg = AttributeConfig(**kw)
    plan = resolve(cfg, models, train, test, get_method(method, **METHOD_KW[method]), ens)
    kernels, qs, singles = [], [], []
    for member in plan.ensemble.members(plan.models, plan.build_context()):
        set_example_index(member.model, torch.arange(2))  # per-example masks: for the probe
        one = etda.attribute(
            member.model, train, test, method, params=member.params, **kw, **METHOD_KW[method]
        ).values
        singles.append(one)
        if method == "trak":
            q_own = _q(member.model, *train)
            kernels.append(one / q_own.numpy()[None, :])
            qs.append(_q(member.q_model or member.model, *train).numpy())
    if method == "trak":
        return np.mean(kernels, 0) * np.mean(qs, 0)[None, :]
    return np.mean(singles, 0)


METHOD_KW = {"graddot": {}, "trak": {"damping": 1e-2}}


def _ensembles(trained):
    models = [copy.deepcopy(r.model).double() for r in trained]
    ckpt = []
    for state in trained[0].checkpoints:
        m = copy.deepcopy(trained[0].model).double()
        m.load_state_dict(state)
        ckpt.append(m)
    lora = {"rank": 2, "epochs": 1, "batch_size": 4}
    trajectory = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "optimizer": "adam"}
    return {
        "independent": (None, models),
        "checkpoints": (etda.Checkpoints(), ckpt),
        "projection-seeds": (etda.ProjectionSeeds(3), models[:1]),
        "dropout": (etda.Dropout(2), models[:1]),
        "dropout-per-example": (etda.Dropout(2, mode="per-example"), models[:1]),
        "dropout-forward": (etda.Dropout(3, forward_only=True), models[:1]),
        "lora": (etda.LoRA(2, **lora), models[:1]),
        "snapshots": (etda.Snapshots(2, **trajectory), models[:1]),
        "forks": (etda.Forks(2, subset=0.5, **trajectory), models[:1]),
        "hybrid 2x2 dropout": (etda.Dropout(2), models),
        "hybrid 2x2 lora": (etda.LoRA(2, **lora), models),
    }


@pytest.mark.parametrize("method", ["graddot", "trak"])
def test_every_ensemble_kind_combines_its_members_by_the_rule(tokens, trained, method):
    """Values, not only shapes: each ensemble kind on the transformer equals the combine rule
    applied to its members attributed one by one (float64, exact gradients: 1e-9)."""
    (x, y), test = tokens
    kw = {"task": SequenceTask(), "projection": "identity", "dtype": "float64"}
    kinds = _ensembles(trained)
    covered = {"none", "checkpoints", "projection-seeds", "dropout", "dropout-per-example"}
    covered |= {"dropout-forward", "lora", "snapshots", "forks"}
    assert set(ENSEMBLES) <= covered  # every registered kind
    single = etda.attribute(
        kinds["independent"][1][0], (x, y), test, method, **kw, **METHOD_KW[method]
    )
    for name, (ens, ms) in kinds.items():
        if method == "graddot" and name == "dropout-forward":
            continue  # forward-only members change only TRAK's Q: refused for Grad-Dot
        s = etda.attribute(ms, (x, y), test, method, ens, **kw, **METHOD_KW[method])
        ref = _reference(method, ms, ens, (x, y), test, **kw)
        scale = np.abs(ref).max()
        assert scale > 1e-6, name
        np.testing.assert_allclose(s.values, ref, rtol=0, atol=1e-9 * scale, err_msg=name)
        n_members = ens.size(len(ms)) if ens else len(ms)
        if name == "projection-seeds":  # identical members (no projection): equal to one
            np.testing.assert_allclose(s.values, single.values, rtol=0, atol=1e-12 * scale)
        elif n_members > 1:  # the members differ, so the check above compared something
            assert np.abs(s.values - single.values).max() > 1e-6 * scale, name


def test_dropout_members_mask_attention_and_mlp(tokens, trained):
    (x, y), test = tokens
    model = trained[0].model
    one = etda.attribute(model, (x, y), test, "graddot", projection="identity")
    ens = etda.attribute(model, (x, y), test, "graddot", etda.Dropout(3), projection="identity")
    assert not np.allclose(one.values, ens.values)  # masks change the function
    copy = _tiny()
    assert install_masks(copy, None, "fixed", 0) == 2
    assert {type(copy.blocks[0].attn.drop), type(copy.blocks[0].mlp[3])} == {MaskedDropout}


def test_lora_features_cover_adapters_only(tokens, trained):
    (x, y), test = tokens
    model = trained[0].model
    before = copy.deepcopy(model.state_dict())  # taken before any adapter is fine-tuned
    lora = etda.LoRA(1, rank=2, epochs=1, batch_size=4)
    ctx = BuildContext(x, y, SequenceTask(), 0, torch.float32, False)
    member = next(lora.members([model], ctx))
    trainable = [n for n, p in member.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0] for n in trainable}
    assert {"blocks.0.attn.q", "blocks.0.attn.out", "blocks.0.mlp.0", "head"} <= wrapped
    n_adapter = sum(p.numel() for n, p in member.model.named_parameters() if "lora_" in n)
    s = etda.attribute(model, (x, y), test, "graddot", lora, projection="identity")
    assert s.costs.feature_bytes == 4 * (N_TR + N_TE) * n_adapter  # float32 adapter grads
    # the base model's weights are untouched by fine-tuning the adapters (twice: in
    # members() above and inside attribute)
    after = model.state_dict()
    assert list(after) == list(before)
    for n, p in before.items():
        assert torch.equal(p, after[n]), n


@needs_kjv
def test_kjv_setting_output_is_summed_token_logprobs():
    s = get_setting("kjv-transformer")
    assert s.task == "sequence" and s.make_task().name == "sequence"
    d = s.data()
    assert d.num_classes == s.model_kwargs["vocab_size"]
    model = s.make_model(0)
    x, y = d.x_test[:7], d.y_test[:7]
    out = s.output(model, x, y, batch_size=3)
    assert out.dtype == torch.float64 and out.shape == (7,)
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(x).double(), -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(out, logp.sum(1))
    with pytest.raises(ValueError, match="next-token targets"):
        s.output(model, x, y[:, 0])


def test_sequence_training_loss_and_subsets(tokens):
    """Sequence training minimises the mean token CE; classification is unchanged."""
    (x, y), _ = tokens
    recipe = TrainRecipe(optimizer="adam", lr=1e-2, weight_decay=0.0, epochs=4, batch_size=4)
    m = _tiny(dropout=0.0)
    before = SequenceTask().loss(m(x), y).mean().item()
    r = train_model(m, x, y, recipe, 0)  # task inferred from the 2-D targets
    after = SequenceTask().loss(r.model(x), y).mean().item()
    assert after < before
    r2 = train_model(_tiny(dropout=0.0), x, y, recipe, 0, task="sequence")
    for a, b in zip(r.model.state_dict().values(), r2.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="token ids"):
        train_model(_tiny(), x, y + V, recipe, 0)
    with pytest.raises(ValueError, match="unknown task"):
        train_model(_tiny(), x, y, recipe, 0, task="regression")
