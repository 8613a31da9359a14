"""Clear errors for bad inputs, and the Scores container (save/load, top-k)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import etda

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0, d: int = 6, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).to(D64)


def make_data(n: int, seed: int, d: int = 6, c: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, c, (n,), generator=g)


MODEL = make_mlp()
TRAIN, TEST = make_data(12, 1), make_data(4, 2)


def run(model=MODEL, train=TRAIN, test=TEST, **kw) -> etda.Scores:
    kw = {"method": "graddot", "projection": "identity", "dtype": "float64", **kw}
    return etda.attribute(model, train=train, test=test, **kw)


def test_valid_call_works():
    assert run().values.shape == (4, 12)


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("which", ["train", "test"])
def test_length_mismatch(which):
    x, y = TRAIN if which == "train" else TEST
    bad = (x, y[:-1])
    with pytest.raises(
        ValueError, match=rf"{which}: x has {len(x)} examples but y has {len(x) - 1}"
    ):
        run(**{which: bad})


@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("label", [3, -1, 100])
def test_labels_out_of_range(which, label):
    x, y = TRAIN if which == "train" else TEST
    y = y.clone()
    y[-1] = label  # the last example, so a check of the first rows only would miss it
    with pytest.raises(ValueError, match="out of range") as info:
        run(**{which: (x, y)})
    assert which in str(info.value) and "3 classes" in str(info.value)


def test_float_labels_for_a_classifier_are_refused():
    # float targets mean regression (etda.RegressionTask); a classifier's logits do not fit
    with pytest.raises(ValueError, match="read as regression: pass integer labels"):
        run(train=(TRAIN[0], TRAIN[1].double()))


@pytest.mark.parametrize("which", ["train", "test"])
def test_empty_set(which):
    x, y = TRAIN if which == "train" else TEST
    with pytest.raises(ValueError, match=f"{which} set is empty"):
        run(**{which: (x[:0], y[:0])})


@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_the_examples(which, bad):
    x, y = TRAIN if which == "train" else TEST
    x = x.clone()
    x[1, 2] = bad
    x[3, 0] = bad
    with pytest.raises(etda.NonFiniteError, match=r"index \[1, 3\]") as info:
        run(**{which: (x, y)})
    assert which in str(info.value)
    assert isinstance(info.value, ValueError)


def _overflowing_model() -> nn.Module:
    """Logistic regression whose logits overflow to inf only where x[:, 0] != 0."""
    m = nn.Sequential(nn.Linear(6, 3)).to(D64)
    with torch.no_grad():
        m[0].weight.fill_(0.1)
        m[0].weight[0, 0] = 1e308
    return m


@pytest.mark.parametrize("which,rows", [("train", [5, 7]), ("test", [1])])
def test_non_finite_gradients_name_the_examples(which, rows):
    m = _overflowing_model()
    train = (TRAIN[0].clone(), TRAIN[1])
    test = (TEST[0].clone(), TEST[1])
    train[0][:, 0] = 0.0
    test[0][:, 0] = 0.0
    target = train if which == "train" else test
    target[0][rows, 0] = 10.0
    # loss gradients: every overflowing example is named (rows [5, 7] share chunk [4, 8))
    with pytest.raises(etda.NonFiniteError) as info:
        run(m, train, test, method="graddot", chunk_size=4)
    msg = str(info.value)
    assert f"{which} example(s) at index {rows}" in msg, msg
    assert "weights" in msg
    # margin gradients (TRAK): only bad examples are named (a margin of +inf has a finite
    # gradient, so the first failing block may name a subset)
    with pytest.raises(etda.NonFiniteError, match=rf"{which} example\(s\) at index \[") as info:
        run(m, train, test, method="trak", chunk_size=4)
    named = json.loads(str(info.value).split("at index ")[1].split("]")[0] + "]")
    assert named and set(named) <= set(rows)


def test_nan_weights_raise_non_finite_error():
    m = make_mlp()
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    with pytest.raises(etda.NonFiniteError, match=r"index \[0, 1, 2"):
        run(m)


def test_float64_data_with_float32_model():
    m32 = make_mlp().float()
    ref = run(m32, (TRAIN[0].float(), TRAIN[1]), (TEST[0].float(), TEST[1]), dtype="float32")
    got = run(m32, (TRAIN[0].numpy(), TRAIN[1].numpy()), TEST, dtype="float32")
    np.testing.assert_array_equal(got.values, ref.values)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("which", ["train", "test"])
def test_model_and_data_dimension_mismatch(which):
    x, y = make_data(5, 3, d=7)
    with pytest.raises(ValueError, match=rf"cannot process the {which} inputs of shape \(7,\)"):
        run(**{which: (x, y)})


def test_sequence_labels_with_a_classifier():
    y = torch.zeros(12, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match the model"):
        run(train=(TRAIN[0], y))


def test_models_must_be_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        run(model=[])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        run(model=[MODEL, "not a model"])


# ---------------------------------------------------------------------- options


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'bogus'.*graddot"):
        run(method="bogus")


@pytest.mark.parametrize("proj_dim", [0, -4, 2.5])
def test_bad_proj_dim(proj_dim):
    with pytest.raises(ValueError, match="proj_dim must be a positive integer"):
        run(projection="gaussian", proj_dim=proj_dim)


def test_unknown_projection():
    with pytest.raises(ValueError, match=r"unknown projection 'bogus'.*gaussian"):
        run(projection="bogus")


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "4", True, 4.0])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer") as info:
        run(chunk_size=chunk_size)
    assert repr(chunk_size) in str(info.value)


@pytest.mark.parametrize("dtype", ["bogus", "float16", "torch.float64", torch.float64, None])
def test_bad_dtype(dtype):
    """Once a raw AttributeError (getattr(torch, 'bogus')); now named with the choices."""
    with pytest.raises(ValueError, match=r"unknown dtype .*must be one of float32, float64"):
        run(dtype=dtype)


@pytest.mark.parametrize("top_k", [-1, 2.5, "3", True])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0") as info:
        run(top_k=top_k)
    assert repr(top_k) in str(info.value)


@pytest.mark.parametrize("budget", [0, -5, "0GB", "-1GB", float("nan"), "lots", None])
def test_bad_memory_budget(budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive size") as info:
        run(memory_budget=budget)
    assert repr(budget) in str(info.value)


@pytest.mark.parametrize(
    "ensemble,shown",
    [
        ("dropout", "str 'dropout'"),
        (object(), "object"),
        (etda.Dropout, r"the class Dropout \(pass an instance: Dropout\(...\)\)"),
        ([etda.Dropout(2)], "list"),
        (2, "int 2"),
    ],
)
def test_ensemble_of_the_wrong_type(ensemble, shown):
    with pytest.raises(TypeError, match=rf"ensemble must be an etda ensemble.*got {shown}"):
        run(ensemble=ensemble)


def test_valid_option_types_are_accepted():
    """The checks above refuse only what is wrong: NumPy integers and float32 learning
    rates, a size string and zero top_k are fine."""
    ck = [MODEL.state_dict(), MODEL.state_dict()]
    lrs = np.array([0.1, 0.05], dtype=np.float32)
    s = run(method="tracin", checkpoints=ck, checkpoint_lrs=lrs, memory_budget="64MB", top_k=0)
    assert np.isfinite(s.values).all()
    assert s.config["options"]["checkpoint_lrs"] == pytest.approx([0.1, 0.05])


@pytest.mark.parametrize("method", ["trak", "if"])
def test_bad_damping(method):
    with pytest.raises(ValueError, match="damping must be .*>= 0"):
        run(method=method, damping=-1.0)
    with pytest.raises(ValueError, match="damping must be a number, 'auto', 'gcv' or 'trace:C'"):
        run(method=method, damping="bogus")


def test_influence_options():
    with pytest.raises(ValueError, match="solver must be 'eigen' or 'cg'"):
        run(method="if", solver="bogus")
    with pytest.raises(ValueError, match="numeric damping"):
        run(method="if", solver="cg", damping="auto")
    with pytest.raises(ValueError, match="projection='identity'"):
        run(method="if", solver="cg", damping=1.0, projection="none")


def test_unknown_method_option_is_named():
    with pytest.raises((TypeError, ValueError), match="damping"):
        run(method="graddot", damping=0.1)


def test_tracin_checkpoint_errors():
    with pytest.raises(ValueError, match="needs checkpoints"):
        run(method="tracin")
    ck = [make_mlp(1).state_dict(), make_mlp(2).state_dict()]
    with pytest.raises(ValueError, match="2 checkpoints but 1 checkpoint_lrs"):
        run(method="tracin", checkpoints=ck, checkpoint_lrs=[0.1])
    other = make_mlp(3, d=4).state_dict()
    with pytest.raises(ValueError, match="checkpoint does not match the model"):
        run(method="tracin", checkpoints=[other])
    with pytest.raises(ValueError, match="checkpoint does not match the model: missing"):
        run(method="tracin", checkpoints=[{"0.weight": ck[0]["0.weight"]}])


@pytest.mark.parametrize(
    "lrs,shown",
    [
        ([float("nan")], "nan"),
        ([0.1, -0.1], "-0.1"),
        ([float("inf")], "inf"),
        (["0.1"], "'0.1'"),
        ([True], "True"),
        ([torch.tensor(0.1)], "tensor"),
    ],
)
def test_bad_checkpoint_lrs(lrs, shown):
    """NaN learning rates once gave non-finite scores silently; every bad weight is named."""
    ck = [MODEL.state_dict()] * len(lrs)
    with pytest.raises(ValueError, match=r"checkpoint_lrs must be finite numbers >= 0") as info:
        run(method="tracin", checkpoints=ck, checkpoint_lrs=lrs)
    assert shown in str(info.value)


# ------------------------------------------------------------------------- Scores


@pytest.fixture
def scores() -> etda.Scores:
    return run(method="trak", damping="auto", projection="gaussian", proj_dim=8)


def test_scores_save_load_round_trip_without_pickle(tmp_path, scores, monkeypatch):
    scores.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "scores.json",
        "scores.safetensors",
    ]

    def no_pickle(*a, **k):
        raise AssertionError("Scores.load must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = etda.Scores.load(tmp_path / "s")
    assert loaded.values.dtype == scores.values.dtype == np.float64
    np.testing.assert_array_equal(loaded.values, scores.values)
    assert loaded.method == scores.method == "trak"
    assert loaded.config == json.loads(json.dumps(scores.config, default=str))
    assert (
        loaded.config["members"][0]["damping"]["lam"]
        == scores.config["members"][0]["damping"]["lam"]
    )
    assert loaded.costs == scores.costs
    assert loaded.shape == (4, 12)


def test_scores_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\(n_test, n_train\)"):
        etda.Scores(np.zeros(3), "graddot")


def test_top_k_ordering():
    values = np.array([[0.5, -2.0, 3.0, 0.0, 3.0], [-1.0, -1.5, 2.0, 1.0, -3.0]])
    s = etda.Scores(values, "graddot")
    top = s.top(2)
    assert [t["test"] for t in top] == [0, 1]
    assert top[0]["proponents"] == [(2, 3.0), (4, 3.0)]  # ties keep index order
    assert top[0]["opponents"] == [(1, -2.0), (3, 0.0)]
    assert top[1]["proponents"] == [(2, 2.0), (3, 1.0)]
    assert top[1]["opponents"] == [(4, -3.0), (1, -1.5)]
    full = s.top(99)  # k larger than n_train is clipped
    for t, row in zip(full, values, strict=True):
        pro = [v for _, v in t["proponents"]]
        assert len(pro) == 5 and pro == sorted(row, reverse=True)
        assert [v for _, v in t["opponents"]] == sorted(row)
        assert all(row[i] == v for i, v in t["proponents"])
    assert all(t["proponents"] == [] for t in s.top(0))


def test_top_k_on_engine_scores(scores):
    for t, row in zip(scores.top(3), scores.values, strict=True):
        idx = [i for i, _ in t["proponents"]]
        assert idx == list(np.argsort(-row, kind="stable")[:3])
        assert [i for i, _ in t["opponents"]] == list(np.argsort(row)[:3])


@pytest.mark.parametrize("k", [-1, 2.5, "2", True])
def test_top_bad_k_is_refused(k):
    with pytest.raises(ValueError, match=r"k must be an integer >= 0"):
        etda.Scores(np.arange(6.0).reshape(2, 3), "graddot").top(k)


def test_scoring_out_of_budget_names_what_holds_the_memory() -> None:
    # small scores but a process that already fills the budget: the advice is the budget,
    # not scores_out (which would not help)
    from etda.engine.memory import MemoryBudgetError, MemoryModel
    from etda.engine.scorers import _in_memory_advice

    err = MemoryBudgetError("no block fits")
    small = _in_memory_advice(err, 200, 2000, 200 * 2000 * 8, MemoryModel(2 * 1024**3))
    assert "already holds" in small and "memory_budget" in small and "scores_out" not in small
    big = _in_memory_advice(err, 10**4, 10**5, 8 * 10**9, MemoryModel(2 * 1024**3))
    assert "scores_out" in big
