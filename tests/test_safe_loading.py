"""Loading is safe: a tampered or damaged Scores folder gives a clear error naming the file
and never executes anything (no pickle is ever read). The feature store's metadata and
arrays get the same treatment in test_store.py ("safe loading")."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import etda
from etda.scores import ScoresFileError

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling it would create ``marker``: every test asserts that never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, (x[:12], y[:12]), (x[12:], y[12:])


@pytest.fixture
def saved(tmp_path, problem) -> Path:
    model, train, test = problem
    etda.attribute(model, train, test, method="graddot", projection="identity").save(tmp_path / "s")
    return tmp_path / "s"


@pytest.fixture
def saved_out_of_core(tmp_path, problem) -> Path:
    model, train, test = problem
    s = etda.attribute(
        model,
        train,
        test,
        method="graddot",
        projection="gaussian",
        proj_dim=8,
        scores_out=tmp_path / "values.npy",
        top_k=3,
    )
    assert s.topk is not None and getattr(s.values, "filename", None)
    s.save(tmp_path / "s")
    return tmp_path / "s"


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loading must never unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _json(folder: Path) -> dict:
    return json.loads((folder / "scores.json").read_text())


def _set_json(folder: Path, meta: object) -> None:
    (folder / "scores.json").write_text(json.dumps(meta))


def test_round_trips(saved, saved_out_of_core):
    assert etda.Scores.load(saved).shape == (4, 12)
    loaded = etda.Scores.load(saved_out_of_core)
    assert loaded.shape == (4, 12) and loaded.topk["proponents"].shape == (4, 3)


@pytest.mark.parametrize(
    "tamper,needle",
    [
        (lambda f: (f / "scores.json").unlink(), "not a saved Scores folder"),
        (lambda f: (f / "scores.json").write_text("{not json"), "scores.json is unreadable"),
        (lambda f: _set_json(f, [1, 2]), "lacks a valid method, config, costs"),
        (lambda f: _set_json(f, {**_json(f), "method": 3}), "lacks a valid method"),
        (lambda f: _set_json(f, {**_json(f), "config": "x"}), "lacks a valid config"),
        (lambda f: _set_json(f, {**_json(f), "costs": {"train_s": "1 h"}}), "invalid costs"),
        (lambda f: (f / "scores.safetensors").write_bytes(b"\x00" * 40), "unreadable"),
        (lambda f: (f / "scores.safetensors").unlink(), "no scores"),
        (
            lambda f: save_file({"values": torch.zeros(5)}, f / "scores.safetensors"),
            "2-D float array",
        ),
        (
            lambda f: save_file(
                {"values": torch.zeros(4, 12, dtype=torch.int64)}, f / "scores.safetensors"
            ),
            "2-D float array",
        ),
    ],
)
def test_tampered_dense_folder(saved, tamper, needle):
    tamper(saved)
    with pytest.raises(ScoresFileError, match=needle):
        etda.Scores.load(saved)


def _topk(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(folder / "scores.safetensors"))


def _set_topk(folder: Path, **changes) -> None:
    tensors = {**_topk(folder), **changes}
    save_file({k: v for k, v in tensors.items() if v is not None}, folder / "scores.safetensors")


@pytest.mark.parametrize(
    "tamper,needle",
    [
        (lambda f: _set_json(f, {**_json(f), "values_npy": 7}), "values_npy must be a path"),
        (
            lambda f: _set_json(f, {**_json(f), "values_npy": str(f / "missing.npy")}),
            "not an existing .npy",
        ),
        (
            lambda f: _set_json(f, {**_json(f), "values_npy": "/etc/hostname"}),
            "not an existing .npy",
        ),
        (
            lambda f: (Path(_json(f)["values_npy"])).write_bytes(b"\x93NUMPY garbage"),
            "unreadable",
        ),
        (lambda f: _set_topk(f, **{"topk.opponents": None}), "expected values and topk"),
        (
            lambda f: _set_topk(f, **{"topk.proponents": torch.full((4, 3), 12)}),
            r"training indices in \[0, 12\)",
        ),
        (
            lambda f: _set_topk(f, **{"topk.opponents": torch.full((4, 3), -1)}),
            "training indices",
        ),
        (
            lambda f: _set_topk(f, **{"topk.proponent_scores": torch.zeros(4, 2)}),
            "has shape",
        ),
        (lambda f: _set_topk(f, **{"topk.proponents": torch.zeros(4, 3)}), "training indices"),
    ],
)
def test_tampered_out_of_core_folder(saved_out_of_core, tamper, needle):
    tamper(saved_out_of_core)
    with pytest.raises(ScoresFileError, match=needle):
        etda.Scores.load(saved_out_of_core)


def test_pickles_in_a_scores_folder_never_run(saved, tmp_path, monkeypatch):
    """Pickled payloads where the arrays should be: refused, and nothing executes (the
    payload would create a file; pickle itself is patched to fail loudly if called)."""
    marker = tmp_path / "executed"
    (saved / "scores.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ScoresFileError, match="scores.safetensors is unreadable"):
        etda.Scores.load(saved)
    (saved / "scores.safetensors").unlink()
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    _set_json(saved, {**_json(saved), "values_npy": str(evil)})
    with pytest.raises(ScoresFileError, match="evil.npy is unreadable"):
        etda.Scores.load(saved)
    (saved / "scores.pkl").write_bytes(pickle.dumps(Payload(marker)))  # never looked at
    assert not marker.exists()


def test_a_scores_folder_is_not_a_feature_store_and_vice_versa(saved, tmp_path, problem):
    """Pointing one loader at the other's folder fails clearly, never silently."""
    model, train, test = problem
    store = tmp_path / "store"
    etda.attribute(model, train, test, method="graddot", projection="identity", store=store)
    with pytest.raises(ScoresFileError, match="not a saved Scores folder"):
        etda.Scores.load(store)
    with pytest.raises((etda.StaleStoreError, ScoresFileError, ValueError)):
        etda.Scores.load(store / "member-000" / "train")
