"""Exactness of the attribution engine against explicit float64 references.

Every engine result is compared with a direct computation on a tiny model: per-example
gradients from a Python loop of single backward passes, closed-form influence with an
exact Hessian, and the explicit TRAK formula. Tolerances are tight (float64).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import etda
from etda.models import LogisticRegression

D64 = torch.float64


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0, d: int = 16, h: int = 8, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(D64).eval()


def make_data(n: int, d: int = 16, c: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def ce_loss(out: Tensor, y: Tensor) -> Tensor:
    if out.ndim == 3:  # sequence: mean token cross-entropy
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def margin(out: Tensor, y: Tensor) -> Tensor:
    """logit_y - logsumexp(other logits), summed over the batch (batch of one)."""
    correct = out.gather(1, y[:, None])[:, 0]
    others = out.masked_fill(F.one_hot(y, out.shape[1]).bool(), float("-inf"))
    return (correct - torch.logsumexp(others, 1)).sum()


def loop_grads(
    model: nn.Module, x: Tensor, y: Tensor, fn=ce_loss, names: list[str] | None = None
) -> Tensor:
    """Per-example gradients (n, p) from n single-example backward passes."""
    model = model.eval()
    named = dict(model.named_parameters())
    names = names if names is not None else list(named)
    rows = []
    for i in range(x.shape[0]):
        value = fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(value, [named[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(named[n])).reshape(-1)
                    for g, n in zip(grads, names, strict=True)
                ]
            )
        )
    return torch.stack(rows).detach()


def q_term(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return 1.0 - torch.softmax(model.eval()(x), 1).gather(1, y[:, None])[:, 0]


def assert_close(actual, expected, tol: float = 1e-9) -> None:
    """Max abs error below ``tol`` times the reference's scale (and the reference is non-zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 1e-8, "reference is (numerically) zero: the test would be vacuous"
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.1e} * {scale:.3e}"


def run(model, train, test, method="graddot", **kw) -> etda.Scores:
    kw.setdefault("dtype", "float64")
    return etda.attribute(model, train=train, test=test, method=method, **kw)


N_TR, N_TE = 24, 6


@pytest.fixture(scope="module")
def mlp_setup():
    m = make_mlp()
    train, test = make_data(N_TR, seed=1), make_data(N_TE, seed=2)
    g_tr, g_te = loop_grads(m, *train), loop_grads(m, *test)
    return m, train, test, g_tr, g_te


# ------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize("use_hooks", [True, False])
def test_graddot_equals_loop_of_backward_passes(mlp_setup, use_hooks):
    m, train, test, g_tr, g_te = mlp_setup
    s = run(m, train, test, projection="identity", use_hooks=use_hooks)
    assert s.values.shape == (N_TE, N_TR)
    assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-11)


def test_projection_none_equals_identity_for_every_method(mlp_setup):
    m, train, test, *_ = mlp_setup
    for method, opts in [
        ("graddot", {}),
        ("gradcos", {}),
        ("if", {"damping": 0.05}),
        ("trak", {"damping": 0.3}),
        ("trak", {"damping": "auto"}),
    ]:
        a = run(m, train, test, method, projection="none", **opts)
        b = run(m, train, test, method, projection="identity", **opts)
        assert_close(a.values, b.values, 1e-9)


@pytest.mark.parametrize("projection", ["identity", "none"])
def test_proj_dim_without_a_projection_is_refused(mlp_setup, projection):
    """identity/none use exact gradients: a proj_dim would be silently ignored, so it is
    refused (even one equal to the parameter count)."""
    m, train, test, g_tr, _ = mlp_setup
    for k in (8, g_tr.shape[1]):
        with pytest.raises(ValueError, match=rf"proj_dim={k} has no effect.*{projection}"):
            run(m, train, test, projection=projection, proj_dim=k)


def explicit_projection(kind: str, p: int, k: int, seed: int) -> Tensor:
    """The documented projection matrix P (p, k) of ``etda.features.projectors``, built here
    from its seeds: dense kinds draw one (p, k) block (p <= 16384) from
    ``generator(seed, 11, 0)`` scaled by 1/sqrt(k); the count sketch sends coordinate j to
    bucket ``b_j`` with sign ``s_j`` drawn from ``generator(seed, 13)``."""
    from etda.seeding import generator

    if kind == "gaussian":
        return torch.randn(p, k, generator=generator(seed, 11, 0), dtype=D64) / k**0.5
    if kind == "rademacher":
        signs = torch.randint(0, 2, (p, k), generator=generator(seed, 11, 0)).to(D64) * 2 - 1
        return signs / k**0.5
    g = generator(seed, 13)
    buckets = torch.randint(0, k, (p,), generator=g)
    signs = torch.randint(0, 2, (p,), generator=g).to(D64) * 2 - 1
    P = torch.zeros(p, k, dtype=D64)
    P[torch.arange(p), buckets] = signs
    return P


@pytest.mark.parametrize("use_hooks", [True, False])
@pytest.mark.parametrize("projection", ["gaussian", "rademacher", "sparse"])
def test_dense_projections_equal_an_explicit_matrix(mlp_setup, projection, use_hooks):
    """Scores of a flat projection are exactly (g_test P)(g_train P)^T for the explicit P of
    the member's seed: every parameter lands in its own row of P, whatever the chunking
    (chunk_size 5 splits both sets unevenly) or the gradient path (hooks or vmap)."""
    m, train, test, g_tr, g_te = mlp_setup
    p, k = g_tr.shape[1], 24
    s = run(m, train, test, projection=projection, proj_dim=k, seed=3, chunk_size=5)
    seed = s.config["members"][0]["projection_seed"]
    P = explicit_projection(projection, p, k, seed)
    if projection == "rademacher":
        assert torch.equal(P.abs(), torch.full_like(P, 1 / k**0.5)) and P.min() < 0 < P.max()
    if projection == "sparse":
        assert ((P != 0).sum(1) == 1).all()  # one signed bucket per coordinate
    assert_close(s.values, ((g_te @ P) @ (g_tr @ P).T).numpy(), 1e-11)
    # another seed gives another matrix (the check above would catch a seed mix-up)
    other = explicit_projection(projection, p, k, seed + 1)
    assert np.abs(((g_te @ other) @ (g_tr @ other).T).numpy() - s.values).max() > 1e-3


def test_selected_parameters_only(mlp_setup):
    """params= restricts the gradient to a subset (here: the first layer; then weights only)."""
    m, train, test, *_ = mlp_setup
    for sel, names in [
        (["0"], ["0.weight", "0.bias"]),
        (lambda n: n.endswith("weight"), ["0.weight", "2.weight"]),
        (["2.bias"], ["2.bias"]),
    ]:
        g_tr = loop_grads(m, *train, names=names)
        g_te = loop_grads(m, *test, names=names)
        for hooks in (True, False):
            for proj in ("identity", "none"):
                s = run(m, train, test, projection=proj, params=sel, use_hooks=hooks)
                assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-10)


def test_frozen_parameters_are_not_attributed(mlp_setup):
    m, train, test, *_ = mlp_setup
    m = copy.deepcopy(m)
    for t in m[0].parameters():
        t.requires_grad_(False)
    names = ["2.weight", "2.bias"]
    g_tr, g_te = loop_grads(m, *train, names=names), loop_grads(m, *test, names=names)
    s = run(m, train, test, projection="identity")
    assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-10)


class ConvBN(nn.Module):
    """Conv2d(stride 2, padding 1) -> BatchNorm(eval) -> ReLU -> Conv2d(padding='same',
    vmap fallback) -> Linear, on (B, 2, 6, 6) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding="same")
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


@pytest.mark.parametrize("use_hooks", [True, False])
def test_conv_batchnorm_linear_per_example_gradients(use_hooks):
    torch.manual_seed(3)
    m = ConvBN().to(D64)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m.bn.running_mean.copy_(torch.randn(3, dtype=D64))
        m.bn.running_var.copy_(torch.rand(3, dtype=D64) + 0.5)
        m.bn.weight.copy_(torch.randn(3, dtype=D64))
        m.bn.bias.copy_(torch.randn(3, dtype=D64))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 2, 6, 6, generator=g, dtype=D64)
    y = torch.randint(0, 3, (10,), generator=g)
    xt, yt = x[:4] + 0.1, y[:4]
    g_tr, g_te = loop_grads(m, x, y), loop_grads(m, xt, yt)  # (eval mode)
    for proj in ("identity", "none"):
        s = run(m, (x, y), (xt, yt), projection=proj, use_hooks=use_hooks)
        assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-10)


def test_train_mode_model_is_not_modified_and_uses_its_statistics():
    torch.manual_seed(3)
    m = ConvBN().to(D64)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(3, dtype=D64))
        m.bn.running_var.copy_(torch.rand(3, dtype=D64) + 0.5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 2, 6, 6, generator=g, dtype=D64)
    y = torch.randint(0, 3, (10,), generator=g)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    g_tr = loop_grads(m, x, y)  # eval-mode reference with the model's statistics
    m.train()
    s = run(m, (x, y), (x, y), projection="identity")
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"attribute() modified the user's model ({k})"
    assert_close(s.values, (g_tr @ g_tr.T).numpy(), 1e-10)


class TokenMixer(nn.Module):
    """A Linear acting on (B, T, d) inputs; ``pool``: classification, else per-token logits."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 3, pool: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, c)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))  # (B, T, h)
        return self.out(h.mean(1)) if self.pool else self.out(h)


@pytest.mark.parametrize("pool", [True, False], ids=["classification", "sequence"])
@pytest.mark.parametrize("use_hooks", [True, False])
def test_linear_on_sequence_inputs(pool, use_hooks):
    torch.manual_seed(5)
    m = TokenMixer(pool=pool).to(D64)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 7, 4, generator=g, dtype=D64)
    y = torch.randint(0, 3, (9,) if pool else (9, 7), generator=g)
    xt, yt = x[:3] * 0.5, y[:3]
    g_tr, g_te = loop_grads(m, x, y), loop_grads(m, xt, yt)
    for proj in ("identity", "none"):
        s = run(m, (x, y), (xt, yt), projection=proj, use_hooks=use_hooks)
        assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-10)


class Tied(nn.Module):
    """One Linear applied twice (weight sharing): its gradient sums over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("use_hooks", [True, False])
def test_layer_called_twice(use_hooks):
    torch.manual_seed(7)
    m = Tied().to(D64)
    x, y = make_data(8, d=6, seed=8)
    xt, yt = make_data(3, d=6, seed=9)
    g_tr, g_te = loop_grads(m, x, y), loop_grads(m, xt, yt)
    for proj in ("identity", "none"):
        s = run(m, (x, y), (xt, yt), projection=proj, use_hooks=use_hooks)
        assert_close(s.values, (g_te @ g_tr.T).numpy(), 1e-10)


def test_inplace_activation_after_hooked_layer():
    torch.manual_seed(10)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(D64)
    x, y = make_data(10, d=6, seed=11)
    g_tr = loop_grads(m, x, y)
    s = run(m, (x, y), (x, y), projection="identity", use_hooks=True)
    assert_close(s.values, (g_tr @ g_tr.T).numpy(), 1e-10)


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.emb(x).mean(1))


def test_integer_token_inputs():
    torch.manual_seed(12)
    m = Embed().to(D64)
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 7, (8, 5), generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    g_tr = loop_grads(m, x, y)
    s = run(m, (x, y), (x, y), projection="identity")
    assert_close(s.values, (g_tr @ g_tr.T).numpy(), 1e-10)


# ---------------------------------------------------------------------------- gradcos


@pytest.mark.parametrize(
    "projection", ["none", "identity", "gaussian", "rademacher", "sparse", "factored"]
)
def test_gradcos_of_an_example_with_itself_is_one(mlp_setup, projection):
    m, train, _, g_tr, _ = mlp_setup
    k = {} if projection in ("none", "identity") else {"proj_dim": 64}
    s = run(m, train, train, "gradcos", projection=projection, **k)
    np.testing.assert_allclose(np.diag(s.values), 1.0, rtol=0, atol=1e-12)
    assert np.all(np.abs(s.values) <= 1 + 1e-12)
    if projection in ("none", "identity"):
        norms = g_tr.norm(dim=1)
        assert_close(s.values, (g_tr @ g_tr.T / norms[:, None] / norms[None, :]).numpy(), 1e-10)


# ---------------------------------------------------------------------------- tracin


def test_tracin_is_lr_weighted_sum_of_checkpoint_graddots(mlp_setup):
    m, train, test, *_ = mlp_setup
    c1, c2 = make_mlp(seed=20), make_mlp(seed=21)
    lrs = [0.5, 0.125]
    expected = sum(
        lr * (loop_grads(c, *test) @ loop_grads(c, *train).T)
        for c, lr in zip((c1, c2), lrs, strict=True)
    )
    s = run(
        m,
        train,
        test,
        "tracin",
        projection="identity",
        checkpoints=[c1.state_dict(), c2.state_dict()],
        checkpoint_lrs=lrs,
    )
    assert_close(s.values, expected.numpy(), 1e-10)
    # default weights are 1
    s1 = run(m, train, test, "tracin", projection="none", checkpoints=[c1.state_dict()])
    assert_close(s1.values, (loop_grads(c1, *test) @ loop_grads(c1, *train).T).numpy(), 1e-10)


# ------------------------------------------------------------------ influence functions


def exact_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Hessian (p, p) of the mean cross-entropy w.r.t. all parameters (flattened in order)."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in named.items()}
    sizes = [p.numel() for p in named.values()]

    def loss(theta: Tensor) -> Tensor:
        params = {n: c.view(shapes[n]) for n, c in zip(named, theta.split(sizes), strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    theta = torch.cat([p.reshape(-1) for p in named.values()])
    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("classes", [2, 4], ids=["binary", "multiclass"])
@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_if_cg_equals_closed_form_logistic_regression(classes, lam):
    torch.manual_seed(30)
    m = LogisticRegression(5, classes).to(D64)
    x, y = make_data(40, d=5, c=classes, seed=31)
    xt, yt = make_data(5, d=5, c=classes, seed=32)
    hess = exact_hessian(m, x, y)
    p = hess.shape[0]
    expected = loop_grads(m, xt, yt) @ torch.linalg.solve(
        hess + lam * torch.eye(p, dtype=D64), loop_grads(m, x, y).T
    )
    s = run(m, (x, y), (xt, yt), "if", solver="cg", damping=lam, projection="identity")
    assert_close(s.values, expected.numpy(), 1e-8)
    # projection="auto" with cg resolves to identity and gives the same
    s_auto = run(m, (x, y), (xt, yt), "if", solver="cg", damping=lam)
    assert_close(s_auto.values, expected.numpy(), 1e-8)


def test_if_cg_equals_exact_hessian_solve_for_an_mlp(mlp_setup):
    m, train, test, g_tr, g_te = mlp_setup
    hess = exact_hessian(m, *train)
    lam = 2.0
    h_damped = hess + lam * torch.eye(hess.shape[0], dtype=D64)
    assert float(torch.linalg.eigvalsh(h_damped).min()) > 0.1  # CG needs a PD system
    expected = g_te @ torch.linalg.solve(h_damped, g_tr.T)
    s = run(m, train, test, "if", solver="cg", damping=lam, projection="identity")
    assert_close(s.values, expected.numpy(), 1e-8)


def test_if_cg_on_an_indefinite_hessian_is_exact_or_refused(mlp_setup):
    m, train, test, g_tr, g_te = mlp_setup
    lam = 0.05
    h_damped = exact_hessian(m, *train) + lam * torch.eye(g_tr.shape[1], dtype=D64)
    eig = torch.linalg.eigvalsh(h_damped)
    assert float(eig.min()) < -0.1 and float(eig.abs().min()) > 1e-4  # indefinite, invertible
    try:
        s = run(m, train, test, "if", solver="cg", damping=lam, projection="identity")
    except (ValueError, RuntimeError) as e:
        assert any(w in str(e) for w in ("indefinite", "curvature", "converge"))
        return
    assert_close(s.values, (g_te @ torch.linalg.solve(h_damped, g_tr.T)).numpy(), 1e-6)


def test_if_cg_with_a_flat_projector_approximates_exact(mlp_setup):
    m, train, test, *_ = mlp_setup
    exact = run(m, train, test, "if", solver="cg", damping=2.0, projection="identity").values
    s = run(m, train, test, "if", solver="cg", damping=2.0, projection="gaussian", proj_dim=4096)
    err = np.linalg.norm(s.values - exact) / np.linalg.norm(exact)
    assert err < 0.3


@pytest.mark.parametrize(
    "projection,form", [("identity", "feature"), ("identity", "sample"), ("none", "auto")]
)
@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_if_eigen_equals_empirical_fisher_closed_form(mlp_setup, projection, form, lam):
    m, train, test, g_tr, g_te = mlp_setup
    n, p = g_tr.shape
    fisher = g_tr.T @ g_tr / n
    expected = g_te @ torch.linalg.solve(fisher + lam * torch.eye(p, dtype=D64), g_tr.T)
    s = run(m, train, test, "if", solver="eigen", damping=lam, projection=projection, form=form)
    assert_close(s.values, expected.numpy(), 1e-8)
    info = s.config["members"][0]["damping"]
    assert info["lam_H"] == pytest.approx(lam, rel=1e-12)


def test_if_eigen_with_more_examples_than_parameters():
    """Feature-space (k <= n) eigen IF on logistic regression, n > p."""
    torch.manual_seed(33)
    m = LogisticRegression(4, 3).to(D64)
    x, y = make_data(60, d=4, seed=34)
    xt, yt = make_data(5, d=4, seed=35)
    g_tr, g_te = loop_grads(m, x, y), loop_grads(m, xt, yt)
    lam = 1e-2
    fisher = g_tr.T @ g_tr / 60
    expected = g_te @ torch.linalg.solve(fisher + lam * torch.eye(15, dtype=D64), g_tr.T)
    for projection in ("identity", "none"):
        s = run(m, (x, y), (xt, yt), "if", damping=lam, projection=projection)
        assert_close(s.values, expected.numpy(), 1e-8)


# ---------------------------------------------------------------------------------- TRAK


def trak_reference(m, train, test, lam) -> np.ndarray:
    phi = loop_grads(m, *train, fn=margin)
    phi_te = loop_grads(m, *test, fn=margin)
    k = phi.shape[1]
    kernel = phi_te @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(k, dtype=D64), phi.T)
    return (kernel * q_term(m, *train)[None, :]).numpy()


@pytest.mark.parametrize("projection", ["identity", "none"])
@pytest.mark.parametrize("form", ["auto", "feature", "sample"])
def test_trak_equals_explicit_formula(mlp_setup, projection, form):
    m, train, test, *_ = mlp_setup
    lam = 0.37
    if projection == "none" and form == "feature":  # exact factors have no feature space
        with pytest.raises(ValueError, match="explicit"):
            run(m, train, test, "trak", projection=projection, damping=lam, form=form)
        return
    s = run(m, train, test, "trak", projection=projection, damping=lam, form=form)
    assert_close(s.values, trak_reference(m, train, test, lam), 1e-8)
    assert s.config["members"][0]["damping"]["lam"] == pytest.approx(lam, rel=1e-14)


def test_trak_feature_form_equals_sample_form_at_full_rank():
    """n > p and n < p, both solved in both spaces."""
    for n in (12, 200):
        m = make_mlp(seed=40, d=6, h=4)  # 43 parameters
        train, test = make_data(n, d=6, seed=41), make_data(5, d=6, seed=42)
        a = run(m, train, test, "trak", projection="identity", damping=0.05, form="feature")
        b = run(m, train, test, "trak", projection="identity", damping=0.05, form="sample")
        assert a.config["members"][0]["form"] == "feature"
        assert b.config["members"][0]["form"] == "sample"
        assert_close(a.values, b.values, 1e-8)
        assert_close(a.values, trak_reference(m, train, test, 0.05), 1e-8)


def test_trak_auto_damping_is_the_spectral_mean(mlp_setup):
    """damping='auto' is lam = tr(Phi^T Phi) / min(n, k), recorded with the scores."""
    m, train, test, *_ = mlp_setup
    s = run(m, train, test, "trak", projection="identity", damping="auto")
    d = s.config["members"][0]["damping"]
    phi = loop_grads(m, *train, fn=margin)
    lam = float((phi**2).sum()) / min(phi.shape)
    assert d["rule"] == "spectral-mean" and d["c"] == 1.0
    assert d["lam"] == pytest.approx(lam, rel=1e-10)
    assert_close(s.values, trak_reference(m, train, test, lam), 1e-8)


def test_trak_gcv_damping_is_recorded_and_reproduces_formula(mlp_setup):
    m, train, test, *_ = mlp_setup
    s = run(m, train, test, "trak", projection="identity", damping="gcv")
    d = s.config["members"][0]["damping"]
    assert d["rule"] == "gcv" and d["lam"] > 0
    assert d["lam"] in d["grid"] and len(d["grid"]) == len(d["curve"])
    assert int(np.argmin(d["curve"])) == d["grid"].index(d["lam"])
    assert_close(s.values, trak_reference(m, train, test, d["lam"]), 1e-8)


def exact_gcv(phi: Tensor, y: Tensor, lams: list[float]) -> np.ndarray:
    """GCV(lam) = n ||(I - H) y||^2 / tr(I - H)^2 with H = K (K + lam I)^-1, K = Phi Phi^T."""
    s, u = torch.linalg.eigh(phi @ phi.T)
    s = s.clamp_min(0)
    by = u.T @ y
    out = []
    for lam in lams:
        shrink = lam / (s + lam)
        out.append(len(y) * float((shrink**2 * by**2).sum()) / float(shrink.sum()) ** 2)
    return np.array(out)


@pytest.mark.parametrize("n_train", [12, 40])
def test_trak_gcv_damping_is_near_the_exact_gcv_optimum(n_train):
    """damping='gcv' picks (near) the minimizer of the exact GCV criterion on its grid,
    with TRAK's residuals Q = 1 - p as regression targets."""
    m = make_mlp(seed=60, d=5, h=4)  # 39 parameters: n < p and n > p
    train, test = make_data(n_train, d=5, seed=61), make_data(4, d=5, seed=62)
    s = run(m, train, test, "trak", projection="identity", damping="gcv")
    d = s.config["members"][0]["damping"]
    phi = loop_grads(m, *train, fn=margin)
    with torch.no_grad():
        p = torch.softmax(m(train[0]), -1)
        q = 1 - p.gather(1, train[1][:, None])[:, 0]
    curve = exact_gcv(phi, q, d["grid"])
    chosen = exact_gcv(phi, q, [d["lam"]])[0]
    assert chosen <= 1.03 * curve.min(), (d["lam"], d["grid"][int(curve.argmin())])
    base = float((phi**2).sum()) / min(phi.shape)  # c is lam in units of tr(K) / min(n, k)
    assert d["c"] == pytest.approx(d["lam"] / base, rel=1e-9)


def test_trak_trace_damping(mlp_setup):
    m, train, test, *_ = mlp_setup
    phi = loop_grads(m, *train, fn=margin)
    lam = 0.5 * float((phi**2).sum()) / min(phi.shape)
    s = run(m, train, test, "trak", projection="identity", damping="trace:0.5")
    assert s.config["members"][0]["damping"]["lam"] == pytest.approx(lam, rel=1e-10)
    assert_close(s.values, trak_reference(m, train, test, lam), 1e-8)


@pytest.mark.parametrize("method", ["trak", "if"])
@pytest.mark.parametrize("projection", ["identity", "none"])
def test_zero_damping_on_a_singular_system_is_not_silent_nan(method, projection):
    """With n > p the margin-gradient system is singular (softmax outputs sum to zero).
    damping=0 must give finite (pseudo-inverse) scores or a clear error, never NaN."""
    m = make_mlp(seed=50, d=4, h=3)  # 27 parameters
    train, test = make_data(60, d=4, seed=51), make_data(4, d=4, seed=52)
    try:
        s = run(m, train, test, method, projection=projection, damping=0.0)
    except (ValueError, RuntimeError) as e:
        assert "damping" in str(e) or "singular" in str(e)
        return
    assert np.isfinite(s.values).all(), "damping=0 returned non-finite scores silently"


# -------------------------------------------------------------- random projections


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _jl_bound(g_tr: Tensor, g_te: Tensor, k: int, c: float) -> float:
    """c * E||P-error||_F / ||K||_F for an unbiased sketch with Var <= (|g|^2|g'|^2 + K^2)/k."""
    kern = g_te @ g_tr.T
    var = (g_te.norm(dim=1)[:, None] ** 2 * g_tr.norm(dim=1)[None, :] ** 2 + kern**2).sum() / k
    return c * float(var.sqrt() / kern.norm())


# Tolerances from the theory. For an unbiased sketch the relative Frobenius error of the
# kernel has an rms of at most ``rms(k) = sqrt(sum (|g|^2 |g'|^2 + K^2) / k) / ||K||`` (equality
# for Gaussian P; Rademacher and count sketches have less variance): ``_jl_bound(..., c=1)``.
# Here (24 train x 6 test, 163 parameters) rms(64) = 0.598 and rms(4096) = 0.0748. Measured
# over projection seeds 0-29, error / rms(k) lay in:
#   gaussian 0.74-1.28, rademacher 0.72-1.22, sparse 0.00-1.50 (k = 4096 > p: no collisions
#   for some seeds, so a count sketch can be exact), factored 0.32-2.82 (TensorSketch: a
#   product of two count sketches has a larger variance than the dense bound).
# Seed 0 (the one tested): gaussian 1.04 / 0.88, rademacher 0.88 / 0.98, sparse 0.84 / 0.66,
# factored 1.00 / 0.91 (k = 64 / 4096). Hence c = 1.6 for the flat sketches (then
# c * rms(64) = 0.96 < 1: an all-zero sketch, whose error is exactly 1, fails) and 3.2 for
# the factored one. The error falls as 1 / sqrt(k): err(64) / err(4096) = 8 in theory;
# measured 4.7-11.6 (flat, where not exact) and 3.4-20.8 (factored); seed 0: 9.4, 7.2, 10.2,
# 8.8. A zero sketch (ratio 1) and one that ignores the projection (error 0) both fail.
JL = {
    "gaussian": (1.6, 0.5, (4.0, 16.0)),  # (upper c, lower c, err(64)/err(4096) range)
    "rademacher": (1.6, 0.5, (4.0, 16.0)),
    "sparse": (1.6, 0.0, (4.0, float("inf"))),
    "factored": (3.2, 0.0, (3.0, 24.0)),
}


@pytest.mark.parametrize("projection", list(JL))
def test_projections_approximate_exact_graddot(mlp_setup, projection):
    m, train, test, g_tr, g_te = mlp_setup
    exact = (g_te @ g_tr.T).numpy()
    c_up, c_low, (q_low, q_high) = JL[projection]
    errors = {}
    for k in (64, 4096):
        s = run(m, train, test, projection=projection, proj_dim=k)
        assert s.config["proj_dim"] == k
        errors[k] = _relative_error(s.values, exact)
        rms = _jl_bound(g_tr, g_te, k, 1.0)
        assert c_low * rms <= errors[k] < c_up * rms, (k, errors[k], rms)
    assert c_up * _jl_bound(g_tr, g_te, 64, 1.0) < 1 or projection == "factored"
    assert q_low < errors[64] / errors[4096] < q_high, errors


@pytest.mark.parametrize("projection", ["gaussian", "rademacher", "sparse", "factored"])
def test_projections_are_unbiased(mlp_setup, projection):
    """The mean over 40 projection seeds converges to the exact kernel (an unbiased sketch).

    Theory: its error rms is rms(32 * 40) = 0.134 here, sqrt(40) = 6.3 times below a single
    sketch's. Measured over seeds 0-5: error / rms 0.91-1.21 (seed 0: 0.91, 0.93, 1.00, 1.07
    for gaussian, rademacher, sparse, factored), single / mean error 4.7-6.1 (seed 0: 6.1,
    5.3, 5.3, 5.8). The least-squares slope deviates from 1 by <E, K> / ||K||^2 <= the
    relative error (Cauchy-Schwarz); measured at most 0.42 * rms (seed 0 factored: 0.050 =
    0.38 * rms). Bounds: error < 1.4 rms, ratio > 4, |slope - 1| < 0.6 rms = 0.080."""
    m, train, test, g_tr, g_te = mlp_setup
    exact = (g_te @ g_tr.T).numpy()
    k, members = 32, 40
    single = run(m, train, test, projection=projection, proj_dim=k)
    mean = run(
        m,
        train,
        test,
        projection=projection,
        proj_dim=k,
        ensemble=etda.ProjectionSeeds(members=members),
    )
    seeds = {mi["projection_seed"] for mi in mean.config["members"]}
    assert len(seeds) == members
    e1 = _relative_error(single.values, exact)
    em = _relative_error(mean.values, exact)
    rms = _jl_bound(g_tr, g_te, k * members, 1.0)
    assert em < 1.4 * rms, (em, rms)
    assert e1 / em > 4.0, (e1, em)
    # no scale bias: the least-squares slope of the mean sketch on the exact kernel is ~1
    slope = float((mean.values * exact).sum() / (exact**2).sum())
    assert abs(slope - 1.0) < 0.6 * rms, (slope, rms)
