"""The model zoo: trained models are cached, reused bitwise, and never trusted when corrupt."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
import torch

from etda.settings import Setting, get_setting
from etda.zoo import model_folder, trained_models


@pytest.fixture(scope="module")
def setting() -> Setting:
    return get_setting("digits-logreg")


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the zoo retrained a model that should have come from its cache")

    monkeypatch.setattr(Setting, "train", fail)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cached_model_is_reused_bitwise(setting, tmp_path, monkeypatch):
    (first,) = trained_models(setting, 1, tmp_path, progress=False)
    assert not first.cached and first.seconds > 0
    folder = model_folder(setting, tmp_path)
    assert first.path == folder / "seed-0.safetensors"
    assert folder.name == f"digits-logreg-{setting.fingerprint()[:12]}"
    meta = json.loads((folder / "seed-0.json").read_text())
    assert meta["seconds"] == first.seconds and meta["seed"] == 0

    _no_training(monkeypatch)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache is loaded without any complaint
        (again,) = trained_models(setting, 1, tmp_path, progress=False)
    assert time.perf_counter() - t0 < 10.0  # generous: the machine is shared
    assert again.cached
    assert again.seconds == first.seconds  # the original training time, not the load time
    assert _same_weights(first.model, again.model)
    assert not again.model.training


def test_seeds_are_distinct_and_extend_the_cache(setting, tmp_path):
    a, b = trained_models(setting, 2, tmp_path, first_seed=3, progress=False)
    assert (a.seed, b.seed) == (3, 4)
    assert not _same_weights(a.model, b.model)
    c, d, e = trained_models(setting, 3, tmp_path, first_seed=3, progress=False)
    assert c.cached and d.cached and not e.cached
    assert _same_weights(a.model, c.model)


def test_corrupt_weights_are_detected_and_retrained(setting, tmp_path):
    (first,) = trained_models(setting, 1, tmp_path, progress=False)
    data = bytearray(first.path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor bytes: the file still parses
    first.path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        (again,) = trained_models(setting, 1, tmp_path, progress=False)
    assert not again.cached
    assert _same_weights(first.model, again.model)  # training is deterministic in the seed
    (third,) = trained_models(setting, 1, tmp_path, progress=False)
    assert third.cached  # the repaired file is trusted again


def test_truncated_or_mismatched_files_are_not_trusted(setting, tmp_path):
    (first,) = trained_models(setting, 1, tmp_path, progress=False)
    first.path.write_bytes(first.path.read_bytes()[:20])
    with pytest.warns(RuntimeWarning, match="not usable"):
        (again,) = trained_models(setting, 1, tmp_path, progress=False)
    assert not again.cached

    # Files of seed 0 renamed as seed 1: the metadata names the wrong seed.
    folder = model_folder(setting, tmp_path)
    shutil.copy(folder / "seed-0.safetensors", folder / "seed-1.safetensors")
    shutil.copy(folder / "seed-0.json", folder / "seed-1.json")
    with pytest.warns(RuntimeWarning, match="seed"):
        (other,) = trained_models(setting, 1, tmp_path, first_seed=1, progress=False)
    assert not other.cached and not _same_weights(other.model, first.model)

    # Weights without metadata (e.g. a run killed before writing it) are retrained.
    (folder / "seed-1.json").unlink()
    with pytest.warns(RuntimeWarning, match="metadata"):
        (other,) = trained_models(setting, 1, tmp_path, first_seed=1, progress=False)
    assert not other.cached


def test_checkpoints_are_cached_with_their_learning_rates(setting, tmp_path, monkeypatch):
    (tm,) = trained_models(setting, 1, tmp_path, checkpoint_epochs=(25, 50), progress=False)
    assert tm.checkpoint_epochs == [25, 50] and len(tm.checkpoints) == 2
    assert tm.checkpoint_lrs[0] > tm.checkpoint_lrs[1] > 0  # linear decay
    final = tm.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in tm.checkpoints[1].items())
    folder = model_folder(setting, tmp_path)
    assert (folder / "seed-0-epoch-25.safetensors").is_file()

    with monkeypatch.context() as m:
        _no_training(m)
        (sub,) = trained_models(setting, 1, tmp_path, checkpoint_epochs=(50,), progress=False)
        (plain,) = trained_models(setting, 1, tmp_path, progress=False)
    assert sub.cached and sub.checkpoint_lrs == tm.checkpoint_lrs[1:]
    assert torch.equal(sub.checkpoints[0]["linear.weight"], tm.checkpoints[1]["linear.weight"])
    assert plain.cached and plain.checkpoints == []

    # A new epoch: retrained once, keeping the checkpoints recorded before.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (more,) = trained_models(setting, 1, tmp_path, checkpoint_epochs=(10,), progress=False)
    assert not more.cached and more.checkpoint_epochs == [10]
    meta = json.loads((folder / "seed-0.json").read_text())
    assert [c["epoch"] for c in meta["checkpoints"]] == [10, 25, 50]

    # A corrupt checkpoint file is detected like a corrupt model.
    ck = folder / "seed-0-epoch-25.safetensors"
    data = bytearray(ck.read_bytes())
    data[-1] ^= 0x01
    ck.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        (fixed,) = trained_models(setting, 1, tmp_path, checkpoint_epochs=(25,), progress=False)
    assert not fixed.cached


def test_bad_arguments(setting, tmp_path):
    with pytest.raises(ValueError, match="count"):
        trained_models(setting, 0, tmp_path)
    with pytest.raises(ValueError, match="checkpoint_epochs"):
        trained_models(setting, 1, tmp_path, checkpoint_epochs=(51,))
