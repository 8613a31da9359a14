"""Bring your own model, task and data: regression, dict inputs, tuple/ModelOutput outputs,
soft labels, DataLoaders and iterables of batches, HuggingFace models, devices; each against
an exact reference in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import etda
from etda.task import ClassificationTask, RegressionTask, SequenceTask, make_task

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def data(n: int, seed: int, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D64)


# --------------------------------------------------------------------------- regression


def linear_regression(n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=D64) + 0.3 * torch.randn(n, generator=g, dtype=D64)
    model = nn.Linear(3, 1, bias=False).to(D64)
    with torch.no_grad():  # the least-squares fit
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


def test_if_on_linear_regression_equals_the_closed_form() -> None:
    model, x, y = linear_regression()
    xt, yt = x[:5] + 0.1, y[:5]
    lam = 1e-3
    scores = etda.attribute(
        model, (x, y), (xt, yt), method="if", solver="cg", damping=lam, dtype="float64"
    )
    assert scores.config["task"] == "regression"
    w = model.weight.detach()[0]
    r, rt = x @ w - y, xt @ w - yt  # residuals
    h = x.T @ x / x.shape[0]  # Hessian of the mean of 0.5 r^2
    ref = (rt[:, None] * xt) @ torch.linalg.solve(
        h + lam * torch.eye(3, dtype=D64), (r[:, None] * x).T
    )
    np.testing.assert_allclose(scores.values, ref.numpy(), rtol=1e-7, atol=1e-10)


def test_trak_on_a_linear_model_with_the_regression_task_is_the_closed_form() -> None:
    model, x, y = linear_regression(seed=1)
    xt, yt = x[:4] * 0.5, y[:4]
    s = etda.attribute(model, (x, y), (xt, yt), method="trak", damping=0.1, dtype="float64")
    # output = prediction, its gradient is x; Q = 1: TRAK = xt (X^T X + lam I)^-1 X^T
    ref = xt @ torch.linalg.solve(x.T @ x + 0.1 * torch.eye(3, dtype=D64), x.T)
    np.testing.assert_allclose(s.values, ref.numpy(), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------- inputs, outputs and labels


class DictModel(nn.Module):
    """The MLP behind a keyword forward that returns a tuple (logits, extra)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> tuple:
        return self.inner(features * scale[:, None]), features.sum()


@pytest.mark.parametrize("method", ["graddot", "trak", "if"])
def test_dict_inputs_and_tuple_outputs_equal_the_tensor_model(method) -> None:
    (x, y), (xt, yt) = data(20, 1), data(5, 2)
    base = mlp()
    ref = etda.attribute(base, (x, y), (xt, yt), method=method, dtype="float64")
    wrapped = DictModel(base)
    ones, ones_t = torch.ones(20, dtype=D64), torch.ones(5, dtype=D64)
    got = etda.attribute(
        wrapped,
        ({"features": x, "scale": ones}, y),
        ({"features": xt, "scale": ones_t}, yt),
        method=method,
        dtype="float64",
    )
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)
    # the vmap path (no hooks) reads dicts too
    got_vmap = etda.attribute(
        wrapped,
        ({"features": x, "scale": ones}, y),
        ({"features": xt, "scale": ones_t}, yt),
        method=method,
        dtype="float64",
        use_hooks=False,
    )
    np.testing.assert_allclose(got_vmap.values, ref.values, rtol=1e-10, atol=1e-13)


def test_one_hot_labels_equal_integer_labels() -> None:
    (x, y), (xt, yt) = data(20, 3), data(5, 4)
    ref = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64")
    one_hot = nn.functional.one_hot(y, 3).to(D64)
    got = etda.attribute(
        mlp(),
        (x, one_hot),
        (xt, nn.functional.one_hot(yt, 3).to(D64)),
        method="trak",
        dtype="float64",
    )
    assert got.config["task"] == "classification"
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)


def test_a_task_from_two_functions() -> None:
    (x, y), (xt, yt) = data(20, 5), data(5, 6)
    task = make_task(
        lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
        ClassificationTask().output,
    )
    ref = etda.attribute(mlp(), (x, y), (xt, yt), method="graddot", dtype="float64")
    got = etda.attribute(mlp(), (x, y), (xt, yt), method="graddot", dtype="float64", task=task)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12)
    trak = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64", task=task)
    assert np.isfinite(trak.values).all()  # q defaults to ones


# ---------------------------------------------------------------------- streamed data


@pytest.mark.parametrize("chunk_size", [1, 4, 20])
def test_a_dataloader_gives_the_same_scores_as_tensors(chunk_size) -> None:
    (x, y), (xt, yt) = data(20, 7), data(5, 8)
    ref = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64", chunk_size=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)
    test_batches = [(xt[:2], yt[:2]), (xt[2:], yt[2:])]
    got = etda.attribute(
        mlp(), loader, test_batches, method="trak", dtype="float64", chunk_size=chunk_size
    )
    np.testing.assert_array_equal(got.values, ref.values) if chunk_size == 4 else (
        np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)
    )
    dicts = [{"x": xt[:3], "labels": yt[:3]}, {"x": xt[3:], "labels": yt[3:]}]
    wrapped = DictKeyModel(mlp())
    got = etda.attribute(wrapped, loader_of_dicts(x, y), dicts, method="trak", dtype="float64")
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)


class DictKeyModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def loader_of_dicts(x, y):
    return [{"x": x[i : i + 7], "labels": y[i : i + 7]} for i in range(0, len(x), 7)]


def test_a_shuffling_loader_is_refused() -> None:
    x, y = data(20, 9)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        etda.attribute(mlp(), loader, data(3, 1), method="graddot", dtype="float64")


# --------------------------------------------------------------------------- errors


def test_an_output_the_task_cannot_read() -> None:
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).to(D64)

        def forward(self, x):
            return {"not": "a tensor", "x": self.lin(x)}

    with pytest.raises(ValueError, match="cannot read the model's output"):
        etda.attribute(Weird(), data(6, 1), data(2, 2), method="graddot", dtype="float64")


def test_a_task_missing_loss() -> None:
    class NoLoss:
        name = "broken"

        def output(self, out, y):
            return out[:, 0]

        def check(self, out, y):
            pass

    with pytest.raises(TypeError, match="lacks loss"):
        etda.attribute(mlp(), data(6, 1), data(2, 2), method="graddot", task=NoLoss())


def test_cuda_requested_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        etda.attribute(mlp(), data(6, 1), data(2, 2), method="graddot", device="cuda")


def test_explicit_cpu_device_equals_the_default() -> None:
    (x, y), (xt, yt) = data(12, 1), data(3, 2)
    ref = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64")
    got = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64", device="cpu")
    np.testing.assert_array_equal(got.values, ref.values)


# ------------------------------------------------------------------ HF transformers


transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=17,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).to(D64).eval()


def gpt2_batch(n: int, seed: int, pad_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 17, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    if pad_from is not None:  # right padding of the second half of the batch
        mask[n // 2 :, pad_from:] = 0
        labels[n // 2 :, pad_from - 1 :] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def loop_gradients(model, x, y, names):
    """Per-example loss gradients by a loop of single-example backward passes."""
    task = SequenceTask()
    rows = []
    for i in range(y.shape[0]):
        model.zero_grad()
        xi = {k: v[i : i + 1] for k, v in x.items()}
        task.loss(model(**xi).logits, y[i : i + 1]).sum().backward()
        params = dict(model.named_parameters())
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


def test_gpt2_per_example_gradients_equal_a_backward_loop_with_padding() -> None:
    from etda.features.featurize import FeatureSpec, Featurizer
    from etda.task import select_parameters

    model = tiny_gpt2()
    x, y = gpt2_batch(6, 1, pad_from=4)
    names = select_parameters(model)
    spec = FeatureSpec("identity", target="loss", dtype="float64")
    fz = Featurizer(model, SequenceTask(), names, spec, (x, y))
    assert fz.layers, "GPT-2's Conv1D projections are hooked, not vmapped"
    got = fz(x, y)["g"]
    ref = loop_gradients(model, x, y, names)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    # padded positions change nothing: other tokens behind the padding give the same rows
    x2 = {k: v.clone() for k, v in x.items()}
    x2["input_ids"][3:, 4:] = (x2["input_ids"][3:, 4:] + 5) % 17
    torch.testing.assert_close(fz(x2, y)["g"], got, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["graddot", "trak", "if"])
def test_gpt2_attribution_with_every_method_and_lora(method) -> None:
    model = tiny_gpt2(1)
    train, test = gpt2_batch(8, 2, pad_from=4), gpt2_batch(3, 3)
    s = etda.attribute(model, train, test, method=method, dtype="float64")
    assert s.values.shape == (3, 8) and np.isfinite(s.values).all()
    assert s.config["task"] == "sequence"
    if method == "graddot":
        lora = etda.attribute(
            model,
            train,
            test,
            method=method,
            dtype="float64",
            ensemble=etda.LoRA(members=2, rank=2, epochs=1, batch_size=4),
        )
        assert lora.values.shape == (3, 8) and np.isfinite(lora.values).all()


def test_bert_style_classifier() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg).to(D64).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (10, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[5:, 4:] = 0
    y = torch.randint(0, 3, (10,), generator=g)
    train = ({"input_ids": ids, "attention_mask": mask}, y)
    test = ({"input_ids": ids[:2], "attention_mask": mask[:2]}, y[:2])
    for ensemble in (None, etda.Dropout(members=2, seed=1)):
        s = etda.attribute(model, train, test, method="trak", dtype="float64", ensemble=ensemble)
        assert s.values.shape == (2, 10) and np.isfinite(s.values).all()


def test_regression_task_shapes() -> None:
    t = RegressionTask()
    out = torch.randn(4, 1, dtype=D64)
    y = torch.randn(4, dtype=D64)
    t.check(out, y)
    assert t.loss(out, y).shape == (4,) and t.output(out, y).shape == (4,)
    with pytest.raises(ValueError, match="floating point"):
        t.check(out, torch.ones(4, dtype=torch.long))


def test_a_dataset_of_dict_items_with_different_shapes() -> None:
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            return {
                "a": torch.randn(3, generator=g, dtype=D64),
                "b": torch.randn(2, generator=g, dtype=D64),
                "labels": torch.tensor(i % 3),
            }

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).to(D64)

        def forward(self, a, b):
            return self.lin(torch.cat([a, b], -1))

    s = etda.attribute(Two(), Items(), Items(), method="graddot", dtype="float64")
    assert s.values.shape == (8, 8) and np.isfinite(s.values).all()


def test_dict_inputs_on_worker_processes(tmp_path) -> None:
    (x, y), (xt, yt) = data(20, 1), data(5, 2)
    wrapped = DictModel(mlp())
    train = ({"features": x, "scale": torch.ones(20, dtype=D64)}, y)
    test = ({"features": xt, "scale": torch.ones(5, dtype=D64)}, yt)
    here = etda.attribute(wrapped, train, test, method="trak", dtype="float64")
    workers = etda.attribute(
        wrapped,
        train,
        test,
        method="trak",
        dtype="float64",
        executor="process",
        workers=2,
        store=tmp_path,
    )
    np.testing.assert_allclose(workers.values, here.values, rtol=1e-10, atol=1e-13)
