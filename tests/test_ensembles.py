"""Ensembles: member equivalences, dropout masks, forward-only TRAK, hybrids, LoRA, costs.

Dropout members are checked against explicit references: the same model with the
member's mask multiplied in by hand, scored by a Python loop of single backward passes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import etda
from etda.ensemble.base import BuildContext, member_seed
from etda.ensemble.dropout import MaskedDropout
from etda.features.featurize import Featurizer

D64 = torch.float64
TEST_OFFSET = 1 << 40  # per-example masks of test examples are keyed by index + 2**40
N_TR, N_TE, D, H, C = 17, 5, 6, 7, 3


pytestmark = pytest.mark.usefixtures("one_thread")


class DropMLP(nn.Module):
    """Linear -> tanh -> Dropout(p) -> Linear."""

    def __init__(self, p: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.drop, self.fc2 = nn.Linear(D, H), nn.Dropout(p), nn.Linear(H, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_model(p: float = 0.3, seed: int = 0) -> nn.Module:
    return DropMLP(p, seed).to(D64)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=D64), torch.randint(0, C, (n,), generator=g)


TRAIN, TEST = make_data(N_TR, 1), make_data(N_TE, 2)


def run(model, method="graddot", **kw) -> etda.Scores:
    kw = {"projection": "identity", "dtype": "float64", **kw}
    return etda.attribute(model, train=TRAIN, test=TEST, method=method, **kw)


def assert_same(a, b, tol: float = 1e-10) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = float(np.abs(b).max())
    assert scale > 1e-8
    err = float(np.abs(a - b).max())
    assert err <= tol * scale, f"max abs difference {err:.3e} (scale {scale:.3e})"


def mask_for(p: float, mode: str, seed: int, index: Tensor) -> Tensor:
    """The member's dropout mask (len(index), H) for examples at ``index``."""
    md = MaskedDropout(p, mode, seed, layer=0)
    md.set_index(index)
    return md(torch.ones(len(index), H, dtype=D64))


def masked_forward(model: DropMLP, x: Tensor, mask: Tensor) -> Tensor:
    return model.fc2(torch.tanh(model.fc1(x)) * mask)


def loop_grads(model: DropMLP, x: Tensor, y: Tensor, masks: Tensor, fn: str = "loss") -> Tensor:
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        out = masked_forward(model, x[i : i + 1], masks[i : i + 1])
        if fn == "loss":
            value = F.cross_entropy(out, y[i : i + 1])
        else:
            yi = y[i]
            others = torch.cat([out[0, :yi], out[0, yi + 1 :]])
            value = out[0, yi] - torch.logsumexp(others, 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows).detach()


def dropout_graddot_reference(models, p: float, mode: str, members: int, seed: int = 0):
    """Mean over all (model k, member j) of the masked models' exact Grad-Dot."""
    total = 0.0
    for k, model in enumerate(models):
        for j in range(members):
            s = member_seed(seed, k, j)
            m_tr = mask_for(p, mode, s, torch.arange(N_TR))
            m_te = mask_for(p, mode, s, torch.arange(N_TE) + TEST_OFFSET)
            g_tr = loop_grads(model, *TRAIN, m_tr)
            g_te = loop_grads(model, *TEST, m_te)
            total = total + g_te @ g_tr.T
    return (total / (len(models) * members)).numpy()


def q_of(model: DropMLP, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return 1 - torch.softmax(masked_forward(model, x, mask), 1).gather(1, y[:, None])[:, 0]


# ------------------------------------------------------------------ identical members


@pytest.mark.parametrize(
    "method,opts", [("graddot", {}), ("if", {"damping": 0.1}), ("trak", {"damping": "auto"})]
)
def test_identical_members_equal_one_member(method, opts):
    m = make_model()
    single = run(m, method, **opts).values
    for models, ens in (
        ([m, m, m], None),
        ([m, copy.deepcopy(m)], etda.Checkpoints()),
        (m, etda.ProjectionSeeds(members=3)),
        ([m, m], etda.ProjectionSeeds(members=2)),
    ):
        for projection in ("identity", "none"):
            got = run(models, method, ensemble=ens, projection=projection, **opts).values
            assert_same(got, single)


# ------------------------------------------------------------------------ dropout masks


def test_fixed_mask_is_shared_by_every_example():
    p, units = 0.3, 20000
    md = MaskedDropout(p, "fixed", seed=123, layer=0)
    md.set_index(torch.arange(4))
    out = md(torch.ones(4, units, dtype=D64))
    assert torch.equal(out, out[:1].expand(4, -1))
    values = set(out.unique().tolist())
    assert values == {0.0, 1.0 / (1 - p)}
    assert abs(float((out[0] == 0).double().mean()) - p) < 0.015
    # the same for another batch size and other indices (a pure function of seed and layer)
    other = MaskedDropout(p, "fixed", seed=123, layer=0)
    other.set_index(torch.arange(100, 107))
    assert torch.equal(other(torch.ones(7, units, dtype=D64))[3], out[0])
    # and different for another seed or layer
    assert not torch.equal(MaskedDropout(p, "fixed", 124, 0)(torch.ones(1, units)), out[:1].float())
    assert not torch.equal(MaskedDropout(p, "fixed", 123, 1)(torch.ones(1, units)), out[:1].float())


def test_per_example_masks_depend_only_on_seed_and_index():
    p, units = 0.5, 64
    md = MaskedDropout(p, "per-example", 7, 0)
    md.set_index(torch.arange(10))
    full = md(torch.ones(10, units, dtype=D64))
    assert len({tuple(r.tolist()) for r in full}) == 10, "examples get different masks"
    for lo, hi in ((0, 3), (3, 4), (4, 10)):  # any chunking gives the same rows
        part = MaskedDropout(p, "per-example", 7, 0)
        part.set_index(torch.arange(lo, hi))
        assert torch.equal(part(torch.ones(hi - lo, units, dtype=D64)), full[lo:hi])
    shuffled = MaskedDropout(p, "per-example", 7, 0)
    shuffled.set_index(torch.tensor([9, 2]))
    assert torch.equal(shuffled(torch.ones(2, units, dtype=D64)), full[[9, 2]])
    reseeded = MaskedDropout(p, "per-example", 8, 0)
    reseeded.set_index(torch.arange(10))
    assert not torch.equal(reseeded(torch.ones(10, units, dtype=D64)), full)
    test_keys = MaskedDropout(p, "per-example", 7, 0)
    test_keys.set_index(torch.arange(10) + TEST_OFFSET)
    assert not torch.equal(test_keys(torch.ones(10, units, dtype=D64)), full)


@pytest.mark.parametrize("mode", ["fixed", "per-example"])
@pytest.mark.parametrize(
    "use_hooks,projection", [(True, "identity"), (True, "none"), (False, "none")]
)
def test_dropout_members_equal_masked_model_reference(mode, use_hooks, projection):
    m = make_model(p=0.4)
    expected = dropout_graddot_reference([m], 0.4, mode, members=3)
    got = run(
        m, ensemble=etda.Dropout(members=3, mode=mode), use_hooks=use_hooks, projection=projection
    )
    assert_same(got.values, expected)
    seeds = [mi["mask_seed"] for mi in got.config["members"]]
    assert seeds == [member_seed(0, 0, j) for j in range(3)]


def test_dropout_rate_override():
    m = make_model(p=0.0)  # trained without dropout
    expected = dropout_graddot_reference([m], 0.25, "fixed", members=2)
    got = run(m, ensemble=etda.Dropout(members=2, p=0.25)).values
    assert_same(got, expected)


@pytest.mark.parametrize("mode", ["fixed", "per-example"])
def test_dropout_scores_are_chunk_and_run_invariant_and_seeded(mode):
    m = make_model()
    ens = etda.Dropout(members=2, mode=mode)
    ref = run(m, ensemble=ens, chunk_size=N_TR + N_TE).values
    for chunk in (1, 4):
        assert_same(run(m, ensemble=ens, chunk_size=chunk).values, ref, 1e-12)
    np.testing.assert_array_equal(run(m, ensemble=ens).values, run(m, ensemble=ens).values)
    other_seed = run(m, ensemble=ens, seed=1).values
    other_ens_seed = run(m, ensemble=etda.Dropout(members=2, mode=mode, seed=5)).values
    for other in (other_seed, other_ens_seed):
        assert np.abs(other - ref).max() > 1e-3 * np.abs(ref).max()


# ------------------------------------------------------------------- forward-only TRAK


@pytest.mark.parametrize("projection", ["identity", "gaussian"])
def test_forward_only_with_negligible_rate_equals_plain_trak(projection):
    m = make_model(p=0.3)
    k = {"proj_dim": 16} if projection != "identity" else {}
    plain = run(m, "trak", projection=projection, damping=0.2, **k).values
    fo = run(
        m,
        "trak",
        projection=projection,
        damping=0.2,
        **k,
        ensemble=etda.Dropout(members=3, p=1e-12, forward_only=True),
    ).values
    assert_same(fo, plain, 1e-9)


@pytest.mark.parametrize("mode", ["fixed", "per-example"])
def test_forward_only_trak_is_plain_kernel_times_mean_masked_q(mode, monkeypatch):
    p, members = 0.3, 3
    m = make_model(p=p)
    plain = run(m, "trak", damping=0.2).values
    q_plain = q_of(m, *TRAIN, torch.ones(N_TR, H, dtype=D64))
    kernel = plain / q_plain.numpy()[None, :]
    q_members = [
        q_of(m, *TRAIN, mask_for(p, mode, member_seed(0, 0, j), torch.arange(N_TR)))
        for j in range(members)
    ]
    q_mean = torch.stack(q_members).mean(0).numpy()
    assert np.abs(q_mean - q_plain.numpy()).max() > 1e-3, "masks must change Q (else vacuous)"

    calls = {"n": 0}
    original = Featurizer.__call__

    def counting(fz, x, y):
        calls["n"] += 1
        return original(fz, x, y)

    monkeypatch.setattr(Featurizer, "__call__", counting)
    fo = run(
        m,
        "trak",
        damping=0.2,
        chunk_size=N_TR + N_TE,
        ensemble=etda.Dropout(members=members, mode=mode, forward_only=True),
    )
    assert calls["n"] == 2, "forward-only featurizes the unmasked model once (train + test)"
    assert_same(fo.values, kernel * q_mean[None, :], 1e-9)
    assert len(fo.config["members"]) == members


def trak_kernel(model: DropMLP, mask_tr: Tensor, mask_te: Tensor, lam: float) -> Tensor:
    phi = loop_grads(model, *TRAIN, mask_tr, fn="margin")
    phi_te = loop_grads(model, *TEST, mask_te, fn="margin")
    eye = torch.eye(phi.shape[1], dtype=D64)
    return phi_te @ torch.linalg.solve(phi.T @ phi + lam * eye, phi.T)


def test_trak_ensemble_averages_kernel_and_q_separately():
    m0, m1 = make_model(seed=0), make_model(seed=1)
    ones_tr, ones_te = torch.ones(N_TR, H, dtype=D64), torch.ones(N_TE, H, dtype=D64)
    k0, k1 = (trak_kernel(m, ones_tr, ones_te, 0.2) for m in (m0, m1))
    q0, q1 = (q_of(m, *TRAIN, ones_tr) for m in (m0, m1))
    expected = ((k0 + k1) / 2 * ((q0 + q1) / 2)[None, :]).numpy()
    got = run([m0, m1], "trak", damping=0.2).values
    assert_same(got, expected, 1e-8)
    mean_of_scores = ((k0 * q0 + k1 * q1) / 2).numpy()
    assert np.abs(mean_of_scores - expected).max() > 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize(
    "mode",
    [
        "fixed",
        "per-example",
    ],
)
def test_if_cg_dropout_member_uses_its_own_hessian(mode):
    p, lam, n = 0.4, 2.0, 8
    m = make_model(p=p)
    x, y = TRAIN[0][:n], TRAIN[1][:n]  # test = train set (same size: no shape error)
    s = member_seed(0, 0, 0)
    mask_tr = mask_for(p, mode, s, torch.arange(n))
    mask_te = mask_for(p, mode, s, torch.arange(n) + TEST_OFFSET)
    named = {n: t.detach() for n, t in m.named_parameters()}
    sizes = [t.numel() for t in named.values()]

    def mean_loss(theta: Tensor) -> Tensor:
        w = dict(zip(named, theta.split(sizes), strict=True))
        h = torch.tanh(x @ w["fc1.weight"].view(H, D).T + w["fc1.bias"]) * mask_tr
        return F.cross_entropy(h @ w["fc2.weight"].view(C, H).T + w["fc2.bias"], y)

    theta = torch.cat([t.reshape(-1) for t in named.values()])
    hess = torch.autograd.functional.hessian(mean_loss, theta)
    g_tr = loop_grads(m, x, y, mask_tr)
    g_te = loop_grads(m, x, y, mask_te)
    expected = g_te @ torch.linalg.solve(hess + lam * torch.eye(len(theta), dtype=D64), g_tr.T)
    got = etda.attribute(
        m,
        train=(x, y),
        test=(x, y),
        method="if",
        solver="cg",
        damping=lam,
        projection="identity",
        dtype="float64",
        ensemble=etda.Dropout(members=1, mode=mode),
    )
    assert_same(got.values, expected.numpy(), 1e-8)


def test_forward_only_is_refused_for_methods_without_q():
    with pytest.raises(ValueError, match="forward_only"):
        run(make_model(), "graddot", ensemble=etda.Dropout(members=3, forward_only=True))


# ------------------------------------------------------------------------------ hybrids


@pytest.mark.parametrize("method,opts", [("graddot", {}), ("trak", {"damping": 0.2})])
def test_hybrid_k_by_one_equals_naive_ensemble(method, opts):
    m0, m1 = make_model(seed=0), make_model(seed=1)
    kw = {"projection": "gaussian", "proj_dim": 16, **opts}
    naive = run([m0, m1], method, **kw).values
    hybrid = run([m0, m1], method, ensemble=etda.ProjectionSeeds(members=1), **kw).values
    np.testing.assert_array_equal(hybrid, naive)
    single = run(m0, method, **kw).values
    assert np.abs(naive - single).max() > 1e-3 * np.abs(single).max()


def test_hybrid_k_by_m_dropout_equals_reference():
    m0, m1 = make_model(seed=0), make_model(seed=1)
    got = run([m0, m1], ensemble=etda.Dropout(members=2, mode="per-example"))
    assert [mi["label"] for mi in got.config["members"]] == [
        "model0-mask0",
        "model0-mask1",
        "model1-mask0",
        "model1-mask1",
    ]
    assert_same(got.values, dropout_graddot_reference([m0, m1], 0.3, "per-example", 2))


# --------------------------------------------------------------------------------- LoRA


def lora_param_count(rank: int) -> int:
    return rank * (D + H) + rank * (H + C)


def test_lora_features_are_adapter_sized(tmp_path):
    m, rank = make_model(), 2
    s = run(m, ensemble=etda.LoRA(members=2, rank=rank, epochs=1), store=tmp_path)
    p_lora = lora_param_count(rank)
    for member in ("member-000", "member-001"):
        g = np.load(tmp_path / member / "train" / "g.npy")
        assert g.shape == (N_TR, p_lora)
    a = np.load(tmp_path / "member-000" / "train" / "g.npy")
    b = np.load(tmp_path / "member-001" / "train" / "g.npy")
    assert np.abs(a - b).max() > 1e-6, "adapters with different seeds must differ"
    c = s.costs
    assert c.train_s > 0
    assert c.feature_bytes == 2 * (N_TR + N_TE) * p_lora * 8
    n_base = sum(t.numel() for t in m.parameters())
    assert c.weights_bytes == (n_base + 2 * p_lora) * 8
    assert [mi["label"] for mi in s.config["members"]] == ["model0-lora0", "model0-lora1"]


def test_lora_member_matches_its_adapter_and_tracin_uses_its_checkpoints():
    m = make_model()
    lora = etda.LoRA(members=1, rank=2, epochs=1, lr=1e-2)
    ctx = BuildContext(TRAIN[0], TRAIN[1], etda.ClassificationTask(), 0, D64, False)
    inner, _, ckpts = lora.adapter(m, ctx, member_seed(0, 0, 0))
    names = [n for n, _ in inner.named_parameters() if "lora_" in n]
    assert sum(dict(inner.named_parameters())[n].numel() for n in names) == lora_param_count(2)

    def grads(x, y):
        named = dict(inner.named_parameters())
        rows = []
        for i in range(len(x)):
            loss = F.cross_entropy(inner(x[i : i + 1]), y[i : i + 1])
            g = torch.autograd.grad(loss, [named[n] for n in names])
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows).detach()

    expected = (grads(*TEST) @ grads(*TRAIN).T).numpy()
    for projection in ("identity", "none"):
        got = run(m, ensemble=lora, projection=projection).values
        assert_same(got, expected, 1e-9)
    assert len(ckpts) == 1 and ckpts[0][1] == pytest.approx(1e-2)
    tracin = run(m, "tracin", ensemble=lora).values
    assert_same(tracin, 1e-2 * expected, 1e-9)


# ------------------------------------------------------------------------------- errors


def test_dropout_needs_dropout_layers():
    m = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(D64)
    with pytest.raises(ValueError, match="no nn.Dropout layers"):
        run(m, ensemble=etda.Dropout(members=2))


def test_dropout_rate_zero_needs_an_override():
    with pytest.raises(ValueError, match="dropout rate is 0.*p=0.1"):
        run(make_model(p=0.0), ensemble=etda.Dropout(members=2))
    with pytest.raises(ValueError, match="dropout rate is 0"):
        run(make_model(p=0.3), ensemble=etda.Dropout(members=2, p=0.0))


@pytest.mark.parametrize("members", [0, -1, 2.5])
def test_members_must_be_positive(members):
    for kind in (etda.Dropout, etda.ProjectionSeeds, etda.LoRA):
        with pytest.raises(ValueError, match="members must be a positive integer"):
            kind(members=members)


def test_bad_ensemble_options():
    with pytest.raises(ValueError, match="epochs >= 1"):
        etda.LoRA(members=2, epochs=0)
    with pytest.raises(ValueError, match="rank must be positive"):
        etda.LoRA(members=2, rank=0)
    with pytest.raises(ValueError, match="dropout mode"):
        etda.Dropout(members=2, mode="bogus")
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        run(make_model(), ensemble=etda.Dropout(members=2, p=1.0))


def test_checkpoints_must_come_from_one_run():
    other = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).to(D64)
    with pytest.raises(ValueError, match="checkpoint 1 does not match checkpoint 0"):
        run([make_model(), other], ensemble=etda.Checkpoints())


# -------------------------------------------------------------------------------- costs


@pytest.mark.parametrize(
    "models,ens,method,n_feat,width",
    [
        (2, None, "graddot", 2, None),
        (1, etda.ProjectionSeeds(members=3), "trak", 3, 16),
        (1, etda.Dropout(members=3), "gradcos", 3, None),
        (1, etda.Dropout(members=3, forward_only=True), "trak", 1, 16),
        (2, etda.Dropout(members=2, forward_only=True), "trak", 2, 16),
    ],
)
def test_costs_are_positive_and_add_up(models, ens, method, n_feat, width):
    ms = [make_model(seed=k) for k in range(models)]
    kw = {"projection": "gaussian", "proj_dim": width} if width else {}
    s = run(ms, method, ensemble=ens, train_seconds=2.5, **kw)
    c = s.costs
    for f in ("featurize_train_s", "featurize_test_s", "score_s", "flops"):
        assert getattr(c, f) > 0, f
    assert c.train_s == pytest.approx(2.5)
    assert c.serve_s == pytest.approx(c.featurize_train_s + c.featurize_test_s + c.score_s)
    assert c.bytes == c.weights_bytes + c.feature_bytes
    n_params = sum(t.numel() for t in ms[0].parameters())
    assert c.weights_bytes == models * n_params * 8
    assert c.feature_bytes == n_feat * (N_TR + N_TE) * (width or n_params) * 8
    d = c.to_dict()
    assert d["serve_s"] == c.serve_s and d["bytes"] == c.bytes
    assert etda.Costs.from_dict(d) == c
