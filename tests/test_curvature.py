"""K-FAC and EK-FAC curvature for influence functions, against exact references (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.features.capture import find_layers
from etda.features.curvature import (
    CurvatureSpec,
    FitInputs,
    LayerCurvature,
    Preconditioner,
    fit,
    sample_labels,
)
from etda.features.featurize import FeatureSpec, Featurizer
from etda.task import ClassificationTask

D64 = torch.float64
TASK = ClassificationTask()

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3))
        .to(D64)
        .eval()
    )


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


TRAIN, TEST = data(24, 1), data(6, 2)


def inputs(model: nn.Module, x, y, chunk: int = 5, **kw) -> FitInputs:
    params = [n for n, _ in model.named_parameters()]
    layers, rest = find_layers(model, params)
    return FitInputs(model, TASK, layers, rest, x, y, chunk, D64, **kw)


def per_example_gradient(model: nn.Module, x, y) -> torch.Tensor:
    """The loss gradient of one example in the curvature's layout: each Linear layer's
    ``[dW | db]`` row-major."""
    model.zero_grad()
    TASK.loss(model(x[None]), y[None]).sum().backward()
    parts = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            parts.append(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).reshape(-1))
    return torch.cat(parts)


# ------------------------------------------------------------------ exact references


def test_identity_factors_equal_the_gradient_dot_product() -> None:
    model = mlp()
    layers, _ = find_layers(model, [n for n, _ in model.named_parameters()])
    identity = Preconditioner(
        CurvatureSpec("kfac", damping=0.0),
        [
            LayerCurvature(
                torch.eye(L.d_out, dtype=D64),
                torch.eye(L.d_in, dtype=D64),
                torch.ones(L.d_out, L.d_in, dtype=D64),
                0.0,
            )
            for L in layers
        ],
    )
    params = [n for n, _ in model.named_parameters()]
    fz = Featurizer(
        model,
        TASK,
        params,
        FeatureSpec("none", target="loss", dtype="float64"),
        TRAIN,
        curvature=identity,
    )
    g_train, g_test = fz(*TRAIN)["g"], fz(*TEST)["g"]
    dot = etda.attribute(model, TRAIN, TEST, method="graddot", dtype="float64")
    np.testing.assert_allclose((g_test @ g_train.T).numpy(), dot.values, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_single_example_fisher_is_exact(kind) -> None:
    """One example: the Fisher g g^T (g at the sampled label) is exactly S (x) A, so both
    K-FAC and EK-FAC reproduce it, and their influence is the dense damped inverse."""
    model = nn.Linear(4, 3).to(D64).eval()
    torch.manual_seed(3)
    x, y = data(1, 5)[0][:, :4], torch.tensor([1])
    spec = CurvatureSpec(kind, "sampled", damping=0.05, seed=11)
    pre = fit(spec, inputs(model, x, y))
    label = sample_labels(model, TASK, x, y, torch.arange(1), 11)
    g = per_example_gradient(model, x[0], label[0])
    exact = torch.outer(g, g)
    torch.testing.assert_close(pre.dense(), exact, rtol=1e-10, atol=1e-12)
    # influence on the test set = g_test^T (F + lam I)^-1 g_train at the true labels
    xt, yt = data(4, 6)[0][:, :4], torch.tensor([0, 2, 1, 0])
    scores = etda.attribute(
        model,
        (x, y),
        (xt, yt),
        method="if",
        curvature=kind,
        damping=0.05,
        dtype="float64",
        seed=11,
    )
    inv = torch.linalg.inv(exact + 0.05 * torch.eye(g.numel(), dtype=D64))
    g_tr = per_example_gradient(model, x[0], y[0])
    ref = torch.stack([per_example_gradient(model, xt[i], yt[i]) @ inv @ g_tr for i in range(4)])
    np.testing.assert_allclose(scores.values[:, 0], ref.numpy(), rtol=1e-9, atol=1e-12)


def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis() -> None:
    model = mlp(1)
    spec = CurvatureSpec("ekfac", "empirical", damping=0.0)
    pre = fit(spec, inputs(model, *TRAIN))
    grads = torch.stack([per_example_gradient(model, *ex) for ex in zip(*TRAIN, strict=True)])
    fisher = grads.T @ grads / TRAIN[0].shape[0]
    offset = 0
    for lc in pre.layers:
        q = torch.kron(lc.q_s, lc.q_a)
        size = q.shape[0]
        block = fisher[offset : offset + size, offset : offset + size]
        torch.testing.assert_close(
            torch.diagonal(q.T @ block @ q), lc.eigenvalues.reshape(-1), rtol=1e-9, atol=1e-13
        )
        offset += size


def test_kfac_factors_are_the_layer_covariances() -> None:
    model = nn.Linear(5, 3).to(D64).eval()
    x, y = TRAIN
    pre = fit(CurvatureSpec("kfac", "empirical", 0.0), inputs(model, x, y))
    lc = pre.layers[0]
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=D64)], 1)
    p = torch.softmax(model(x), -1).detach()
    d = (p - nn.functional.one_hot(y, 3)) / 1.0  # d loss / d logits
    s_ref, a_ref = d.T @ d / x.shape[0], a.T @ a / x.shape[0]
    kron = torch.kron(lc.q_s, lc.q_a) @ torch.diag(lc.eigenvalues.reshape(-1))
    kron = kron @ torch.kron(lc.q_s, lc.q_a).T
    torch.testing.assert_close(kron, torch.kron(s_ref, a_ref), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- invariances, resume


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_factors_do_not_depend_on_the_chunk_size(kind) -> None:
    model = mlp(2)
    spec = CurvatureSpec(kind, seed=4)
    ref = fit(spec, inputs(model, *TRAIN, chunk=24)).dense()
    for chunk in (1, 5, 7):
        torch.testing.assert_close(
            fit(spec, inputs(model, *TRAIN, chunk=chunk)).dense(), ref, rtol=1e-12, atol=1e-15
        )


class Interrupted(Exception):
    pass


# 24 examples in chunks of 5: 5 chunks per pass (EK-FAC's 7th chunk is in its second pass)
@pytest.mark.parametrize("kind,after", [("kfac", 2), ("kfac", 4), ("ekfac", 2), ("ekfac", 7)])
def test_a_resumed_fit_equals_an_uninterrupted_one(kind, after, tmp_path) -> None:
    model = mlp(3)
    spec = CurvatureSpec(kind, seed=1)
    full = fit(spec, inputs(model, *TRAIN))
    seen = []

    def stop(n: int) -> None:
        seen.append(n)
        if len(seen) == after:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(spec, inputs(model, *TRAIN, progress=stop), tmp_path, key="k")
    assert list(tmp_path.glob("curvature-*.partial"))
    resumed = fit(spec, inputs(model, *TRAIN), tmp_path, key="k")
    for a, b in zip(resumed.layers, full.layers, strict=True):
        assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.q_s, b.q_s)
    assert not list(tmp_path.glob("curvature-*.partial"))  # cleaned up when done
    # a partial fit of something else is never resumed
    seen.clear()
    with pytest.raises(Interrupted):
        fit(spec, inputs(model, *TRAIN, progress=stop), tmp_path, key="k")
    other = fit(spec, inputs(model, *TRAIN), tmp_path, key="another model")
    assert torch.equal(other.layers[0].eigenvalues, full.layers[0].eigenvalues)


def test_sampled_labels_are_deterministic_under_their_seed() -> None:
    model = mlp(4)
    x, y = data(200, 9)
    idx = torch.arange(200)
    a = sample_labels(model, TASK, x, y, idx, seed=5)
    assert torch.equal(a, sample_labels(model, TASK, x, y, idx, seed=5))
    assert not torch.equal(a, sample_labels(model, TASK, x, y, idx, seed=6))
    # the same labels whatever the chunking: keyed by the example, not the call
    parts = [
        sample_labels(model, TASK, x[i : i + 7], y[i : i + 7], idx[i : i + 7], 5)
        for i in range(0, 200, 7)
    ]
    assert torch.equal(a, torch.cat(parts))
    # and they follow the model's distribution (a loose check on 200 draws)
    p = torch.softmax(model(x), -1).detach()
    assert abs(float(p.gather(1, a[:, None]).mean()) - float((p**2).sum(1).mean())) < 0.05


# ------------------------------------------------------------------- the whole run


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_curvature_with_every_ensemble(kind) -> None:
    kw = dict(method="if", curvature=kind, dtype="float64")
    models = [mlp(0, 0.3), mlp(1, 0.3)]
    one = [etda.attribute(m, TRAIN, TEST, **kw).values for m in models]
    naive = etda.attribute(models, TRAIN, TEST, **kw)
    np.testing.assert_allclose(naive.values, np.mean(one, 0), rtol=1e-12)  # one member each
    twins = etda.attribute(models[0], TRAIN, TEST, ensemble=etda.ProjectionSeeds(3), **kw)
    np.testing.assert_allclose(twins.values, one[0], rtol=1e-12)  # identical members = one
    ckpt = etda.attribute(models, TRAIN, TEST, ensemble=etda.Checkpoints(), **kw)
    np.testing.assert_allclose(ckpt.values, naive.values, rtol=1e-12)
    drop = etda.attribute(models[0], TRAIN, TEST, ensemble=etda.Dropout(members=3, seed=1), **kw)
    assert drop.values.shape == (6, 24) and np.isfinite(drop.values).all()
    assert not np.allclose(drop.values, one[0])  # masks change the curvature and gradients
    lora = etda.attribute(
        models[0], TRAIN, TEST, ensemble=etda.LoRA(members=2, rank=2, epochs=1), **kw
    )
    assert lora.values.shape == (6, 24) and np.isfinite(lora.values).all()
    rec = naive.config["members"][0]["curvature"]
    assert rec["kind"] == kind and rec["fisher"] == "sampled" and len(rec["lam"]) == 2


@pytest.mark.parametrize("sketch", [{}, {"projection": "factored", "proj_dim": 64}])
def test_out_of_core_equals_in_memory(sketch, tmp_path, monkeypatch) -> None:
    from etda.engine.memory import MemoryModel

    kw = dict(method="if", curvature="ekfac", dtype="float64", **sketch)
    dense = etda.attribute(mlp(), TRAIN, TEST, out_of_core=False, **kw)
    assert dense.config["projection"] == sketch.get("projection", "none")
    monkeypatch.setattr(MemoryModel, "score_block", lambda *a, **k: 5)  # several blocks
    monkeypatch.setattr(MemoryModel, "stream_rows", lambda *a, **k: 7)
    blocked = etda.attribute(mlp(), TRAIN, TEST, out_of_core=True, store=tmp_path, **kw)
    assert blocked.config["out_of_core"]
    np.testing.assert_allclose(blocked.values, dense.values, rtol=1e-9, atol=1e-12)


def test_auto_goes_out_of_core_for_exact_preconditioned_gradients(monkeypatch) -> None:
    from etda.engine import memory

    kw = dict(method="if", curvature="kfac", dtype="float64")
    dense = etda.attribute(mlp(), TRAIN, TEST, **kw)
    assert not dense.config["out_of_core"]
    from etda.engine.memory import MemoryModel

    # a process holding 100 MB whose dense path would need more than the 2 GB budget leaves
    monkeypatch.setattr(memory, "rss_bytes", lambda: 100 * 2**20)
    monkeypatch.setattr(MemoryModel, "dense_need", staticmethod(lambda *a: 4 * 2**30))
    small = etda.attribute(mlp(), TRAIN, TEST, memory_budget="2GB", **kw)
    assert small.config["out_of_core"] and small.config["projection"] == "none"
    np.testing.assert_allclose(small.values, dense.values, rtol=1e-9, atol=1e-12)


def test_self_influence_is_the_diagonal() -> None:
    kw = dict(method="if", curvature="kfac", dtype="float64")
    si = etda.self_influence(mlp(), TRAIN, **kw)
    full = etda.attribute(mlp(), TRAIN, TRAIN, **kw)
    np.testing.assert_allclose(si.values[0], np.diag(full.values), rtol=1e-10)


def test_factors_are_stored_and_reused(tmp_path) -> None:
    kw = dict(method="if", curvature="ekfac", dtype="float64", store=tmp_path)
    first = etda.attribute(mlp(), TRAIN, TEST, **kw)
    saved = tmp_path / "member-000" / "curvature.safetensors"
    assert saved.is_file()
    stamp = saved.stat().st_mtime_ns
    again = etda.attribute(mlp(), TRAIN, TEST, **kw)
    np.testing.assert_array_equal(again.values, first.values)
    assert saved.stat().st_mtime_ns == stamp  # loaded, not refitted
    # other weights: the stored factors (and features) do not match and are not used
    with pytest.raises(etda.StaleStoreError):
        etda.attribute(mlp(seed=9), TRAIN, TEST, **kw)


def test_bad_curvature_options_are_clear() -> None:
    with pytest.raises(ValueError, match="curvature must be"):
        etda.attribute(mlp(), TRAIN, TEST, method="if", curvature="hessian")
    with pytest.raises(ValueError, match="fisher must be"):
        etda.attribute(mlp(), TRAIN, TEST, method="if", curvature="kfac", fisher="true")
    with pytest.raises(ValueError, match="damping"):
        etda.attribute(mlp(), TRAIN, TEST, method="if", curvature="kfac", damping="gcv")
    with pytest.raises(ValueError, match="curvature"):
        etda.attribute(mlp(), TRAIN, TEST, method="trak", curvature="kfac")


def test_wide_features_are_multiplied_out_in_column_blocks(monkeypatch) -> None:
    from etda.engine import scorers

    kw = dict(method="if", curvature="ekfac", dtype="float64")
    one_shot = etda.attribute(mlp(), TRAIN, TEST, **kw)
    monkeypatch.setattr(scorers, "WIDE_BYTES", 8 * 66 * 5)  # 5 training columns per block
    blocked = etda.attribute(mlp(), TRAIN, TEST, **kw)
    np.testing.assert_allclose(blocked.values, one_shot.values, rtol=1e-12, atol=1e-15)


def test_worker_processes_precondition_like_the_driver(tmp_path) -> None:
    kw = dict(method="if", curvature="ekfac", dtype="float64")
    here = etda.attribute(mlp(), TRAIN, TEST, **kw)
    workers = etda.attribute(
        mlp(), TRAIN, TEST, executor="process", workers=2, store=tmp_path, **kw
    )
    np.testing.assert_allclose(workers.values, here.values, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", ["gram", "ekfac"])
def test_measure_output_is_the_influence_on_the_test_output(curvature) -> None:
    """``measure="output"``: -g_f(test)^T (H + lam)^-1 g_L(train), positive = raises the test
    margin; against the dense inverse on one training example (where both curvatures are
    exact)."""
    model = nn.Linear(4, 3).to(D64).eval()
    x, y = data(1, 5)[0][:, :4], torch.tensor([1])
    xt, yt = data(4, 6)[0][:, :4], torch.tensor([0, 2, 1, 0])
    kw = dict(method="if", damping=0.05, dtype="float64", seed=11, measure="output")
    if curvature == "ekfac":
        kw |= {"curvature": "ekfac", "fisher": "empirical"}
    scores = etda.attribute(model, (x, y), (xt, yt), **kw)
    g_tr = per_example_gradient(model, x[0], y[0])
    # one example: the empirical Fisher (EK-FAC, exact here) and the Gram curvature
    # Phi^T Phi / n are both g g^T
    h = torch.outer(g_tr, g_tr)
    inv = torch.linalg.inv(h + 0.05 * torch.eye(g_tr.numel(), dtype=D64))

    def output_gradient(xi, yi):
        model.zero_grad()
        ClassificationTask().output(model(xi[None]), yi[None]).sum().backward()
        return torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).reshape(-1)

    ref = torch.stack([-output_gradient(xt[i], yt[i]) @ inv @ g_tr for i in range(4)])
    np.testing.assert_allclose(scores.values[:, 0], ref.numpy(), rtol=1e-8, atol=1e-12)
    assert scores.config["method_options"]["measure"] == "output"
