"""Export a setting's data and trained models for the peer libraries' environment.

Run with etda's environment, from the repository root:

    .venv/bin/python benchmarks/peers/export.py [--setting fmnist-mlp] [--models 5]

Writes into ``benchmarks/peers/work/`` (fmnist-mlp) or ``benchmarks/peers/work/<setting>/``
(any other setting; all gitignored):

* ``data.npz``: x_train, y_train, x_test, y_test (images float32 (N, C, H, W) and labels
  int64 (N,); for the sequence setting token ids int64 (N, T) and next-token targets (N, T));
* ``model-<seed>.safetensors``: the state_dict of the cached trained model of each seed;
* ``meta.json``: the model's name and constructor arguments (``mlp``: the MLP's, as
  before), the task, the setting's fingerprint and the model/data digests, so the peers'
  side can rebuild the same module tree (``peer_models.py``) and check it got the same
  inputs.

The peers' environment never imports etda: everything it needs is in these files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

WORK = Path(__file__).resolve().parent / "work"
DEFAULT_SETTING = "fmnist-mlp"
PEER_MODELS = ("mlp", "resnet9", "char-transformer")  # what run_peer.py can rebuild


def work_dir(setting: str) -> Path:
    """Where a setting's exported inputs and scores live (fmnist-mlp: ``work/`` itself)."""
    return WORK if setting == DEFAULT_SETTING else WORK / setting


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> dict:
    from etda.settings import get_setting
    from etda.zoo import trained_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default=DEFAULT_SETTING)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default: work_dir(setting)")
    args = parser.parse_args(argv)
    args.out = args.out or work_dir(args.setting)

    torch.set_num_threads(1)
    setting = get_setting(args.setting)
    if setting.model_name not in PEER_MODELS:
        raise SystemExit(
            f"the peers benchmark rebuilds {', '.join(PEER_MODELS)}; "
            f"{args.setting} uses {setting.model_name}"
        )
    data = setting.data()
    args.out.mkdir(parents=True, exist_ok=True)
    x_dtype = np.int64 if setting.task == "sequence" else np.float32  # token ids stay ints
    arrays = {
        "x_train": data.x_train.numpy().astype(x_dtype),
        "y_train": data.y_train.numpy().astype(np.int64),
        "x_test": data.x_test.numpy().astype(x_dtype),
        "y_test": data.y_test.numpy().astype(np.int64),
    }
    np.savez(args.out / "data.npz", **arrays)
    models = []
    for tm in trained_models(setting, args.models, progress=False):
        state = {k: v.detach().contiguous().cpu() for k, v in tm.model.state_dict().items()}
        path = args.out / f"model-{tm.seed}.safetensors"
        save_file(state, str(path))
        models.append(
            {
                "seed": tm.seed,
                "file": path.name,
                "train_seconds": tm.seconds,
                "digest": digest({k: v.numpy() for k, v in state.items()}),
            }
        )
    kw = dict(setting.model_kwargs)
    meta = {
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "task": setting.task,
        "model": {"name": setting.model_name, "kwargs": _plain(kw)},
        "data_digest": digest(arrays),
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "models": models,
    }
    if setting.model_name == "mlp":
        meta["mlp"] = {
            "in_features": int(kw.get("in_features", 784)),
            "hidden": [int(h) for h in kw.get("hidden", (128, 128))],
            "num_classes": int(kw.get("num_classes", 10)),
            "dropout": float(kw.get("dropout", 0.1)),
        }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"exported {len(models)} models and data to {args.out}")
    return meta


def _plain(kw: dict) -> dict:
    """Constructor arguments as JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


if __name__ == "__main__":
    main()
