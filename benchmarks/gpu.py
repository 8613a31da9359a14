"""etda on a CUDA device next to TRAK's own library (``traker``) on the same GPU.

On each setting (fmnist-mlp, fmnist2-cnn) etda runs TRAK with a factored projection
(TensorSketch, k = 2048) and exact (projection "none"), IF (defaults), a Dropout(10) TRAK
ensemble and a naive 5-model TRAK ensemble (k = 2048, and exact), with ``device=`` the GPU;
``traker`` runs TRAK on the same GPU, on the same cached models (1 and 5), in the isolated
peers environment of ``benchmarks/peers/`` (it never imports etda, and etda never imports
traker: the two sides share only the files that :func:`export_for_peers` writes). Every
configuration runs in its own process, one after the other, so its peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before the configuration) is its own. The LDS of
every score matrix is computed here against the setting's cached LDS ground truth.

    python -m benchmarks.gpu                          # a CUDA machine: everything
        -> benchmarks/results/gpu.{json,md}
    python -m benchmarks.gpu --device cpu --fast      # tiny CPU check: digits-mlp, 2 etda
        configurations (+ traker when its venv is there), LDSConfig(n_subsets=4), caches and
        results in a temporary folder (or --work/--out), never the real caches
    python -m benchmarks.gpu --prepare                # build the caches only (CPU): the 5 models
        and the LDS ground truth of every setting, and the files traker reads

Useful flags: ``--settings S ...``, ``--only CONFIG ...`` (a partial run keeps the other rows
of an existing gpu.json), ``--repeats N`` / ``--warmup W`` (wall time = the median of N timed
runs after W untimed ones, in the same process; default a single run), ``--peers-python PY``
/ ``--peers-path DIR`` (the interpreter that runs traker, default
``benchmarks/peers/.venv-peers/bin/python`` or ``$PEERS_PYTHON``, and the only thing on its
PYTHONPATH), ``--no-peers``, ``--timeout S`` (per configuration), ``--traker-proj-dim K``.

When the peers interpreter is missing, cannot import traker, or (with ``--device cuda``) has
a torch without CUDA, the traker rows are written as skipped with the reason, and said so
before anything runs. Configurations run in ``RUN_ORDER`` (the pairs with traker first, the
costliest last), each on every setting, and gpu.json/gpu.md are rewritten after every row, so
a run stopped at a time limit keeps what it measured.

On a machine without the peers venv (a GPU lease), traker (pure Python; needs torch, numpy,
tqdm, and safetensors for run_peer.py) runs from a copy of its package: copy
``benchmarks/peers/.venv-peers/lib/python3.11/site-packages/trak`` into a folder DIR and pass
``--peers-python python3 --peers-path DIR``.

Only the standard library is imported at module level: the traker side (``--peer``) runs
this file with the peers' interpreter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_PEER_PY = PEERS / ".venv-peers" / "bin" / "python"
SETTINGS = ("fmnist-mlp", "fmnist2-cnn")
FAST_SETTING = "digits-mlp"
BUDGET = "16GB"
PROJ_DIM = 2048
# traker solves TRAK undamped (its default lambda_reg=0): with k > n_train its X^T X is
# singular and the scores are noise (measured on digits-mlp, n_train 1000, k 2048: LDS 0.005).
# Its k is 2048 where n_train >= 2 x 2048 (fmnist-mlp), else 512 (fmnist2-cnn, digits-mlp).
PEER_SMALL_PROJ_DIM = 512
PEER_BATCH = 500  # traker's train/test batch (as in benchmarks/peers/run_peer.py)
CHECK_ROWS = 8  # test examples whose logits the traker side must reproduce

# etda configurations: name -> (method, ensemble, models, members, projection, proj_dim, what)
CONFIGS: dict[str, tuple[str, str, int, int | None, str, int | None, str]] = {
    "etda-trak-p2048": ("trak", "none", 1, None, "factored", PROJ_DIM, "TRAK, 1 model, k=2048"),
    "etda-trak-exact": ("trak", "none", 1, None, "none", None, "TRAK, 1 model, exact"),
    "etda-if": ("if", "none", 1, None, "auto", None, "IF, 1 model, defaults"),
    "etda-trak-dropout-10": (
        "trak",
        "dropout",
        1,
        10,
        "factored",
        PROJ_DIM,
        "TRAK, 1 model x Dropout(10), k=2048",
    ),
    "etda-trak-naive-5": ("trak", "none", 5, None, "factored", PROJ_DIM, "TRAK, 5 models, k=2048"),
    "etda-trak-naive-5-exact": ("trak", "none", 5, None, "none", None, "TRAK, 5 models, exact"),
}
# traker configurations: name -> (models, the etda configurations it is compared with, what)
PEER_CONFIGS: dict[str, tuple[int, tuple[str, ...], str]] = {
    "traker-1": (1, ("etda-trak-p2048", "etda-trak-exact"), "traker TRAKer, 1 model"),
    "traker-5": (5, ("etda-trak-naive-5", "etda-trak-naive-5-exact"), "traker TRAKer, 5 models"),
}
FAST_CONFIGS = ("etda-trak-p2048", "etda-trak-exact", "traker-1")
ALL_NAMES = (*CONFIGS, *PEER_CONFIGS)  # the tables' order
RUN_ORDER = (  # the pairs with traker first, the costliest last
    "etda-trak-p2048",
    "traker-1",
    "etda-trak-naive-5",
    "traker-5",
    "etda-trak-exact",
    "etda-if",
    "etda-trak-dropout-10",
    "etda-trak-naive-5-exact",
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_device(device: str) -> None:
    """Exit with a clear message when ``device`` is CUDA and CUDA is absent (before any work)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SystemExit(
            f"benchmarks.gpu: --device must be e.g. cuda, cuda:0 or cpu, got {device!r}"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"benchmarks.gpu: --device {device} was asked but CUDA is not available here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}, "
            f"{torch.cuda.device_count()} CUDA devices). Run this on a GPU machine, or check the "
            "script on the CPU with: python -m benchmarks.gpu --device cpu --fast"
        )


def device_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": torch.cuda.get_device_name(device),
            "device_memory_gb": round(props.total_memory / 1024**3, 1),
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _load(name: str, path: Path):
    """A peers module (``export.py``, ``run_peer.py``) loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- etda side


def run_one(
    name: str,
    setting_name: str,
    device: str,
    models_dir: Path,
    lds_dir: Path,
    n_subsets: int,
    threads: int | None,
    repeats: int = 1,
    warmup: int = 0,
) -> dict:
    """One etda configuration in this process (``--one NAME``): scores, LDS, time, memory."""
    check_device(device)
    import torch

    if threads:
        torch.set_num_threads(threads)
    import torch._dynamo  # noqa: F401  (etda's FLOP count imports it: before the timer)

    from etda.evaluate.lds import LDSConfig, lds
    from etda.experiment import build_ground_truth, make_ensemble, run_attribution
    from etda.settings import get_setting
    from etda.zoo import trained_models

    method, kind, k, members, projection, proj_dim, what = CONFIGS[name]
    setting = get_setting(setting_name)
    # outside the timer: the data decoded, the cached models read, the ground truth loaded
    setting.data()
    trained_models(setting, k, models_dir, progress=False)
    gt = build_ground_truth(
        setting, LDSConfig(n_subsets=n_subsets), lds_dir, "inprocess", progress=False
    ).gt
    note = ""
    ensemble: object = kind
    if kind == "dropout":  # models trained without dropout get masks with p=0.1 (etda's rule)
        ensemble, note = make_ensemble("dropout", members).for_model(
            setting.make_model(0), adapt=True
        )
    cuda = torch.device(device).type == "cuda"
    if cuda:  # the CUDA context is made before the timer, and the peak counted from here
        torch.zeros(1, device=device)
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, scores = [], None
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        scores, _ = run_attribution(
            setting,
            method,
            ensemble,
            k,
            members=None,  # the dropout ensemble is an object with its members
            proj_dim=proj_dim,
            projection=projection,
            lds_config=None,  # the LDS is computed below, outside the timer
            model_dir=models_dir,
            progress=False,
            executor="inprocess",
            attribute_options={"device": device, "memory_budget": BUDGET},
        )
        _sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    result = lds(scores.values, gt)
    c = scores.costs
    return {
        "setting": setting_name,
        "name": name,
        "library": "etda",
        "what": what,
        "method": method,
        "ensemble": kind,
        "models": k,
        "members": len(scores.config["members"]),
        "note": note,
        "projection": scores.config["projection"],
        "proj_dim": scores.config["proj_dim"],
        "out_of_core": scores.config["out_of_core"],
        "lds": result.mean,
        "sem": result.sem,
        "wall_s": statistics.median(times),
        "wall_runs_s": times,
        "repeats": repeats,
        "warmup": warmup,
        "attribute_s": scores.config["wall_s"],
        "featurize_s": c.featurize_train_s + c.featurize_test_s,
        "score_s": c.score_s,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "n_train": scores.config["n_train"],
        "n_test": scores.config["n_test"],
        **device_info(device),
    }


def n_models(names) -> int:
    """The trained models the configurations ``names`` need (seeds 0..n-1)."""
    return max(CONFIGS[n][2] if n in CONFIGS else PEER_CONFIGS[n][0] for n in names)


def prepare(
    settings: list[str],
    n_models: int,
    lds_config,
    models_dir: Path,
    lds_dir: Path,
    executor: str,
    workers,
) -> dict:
    """The models and the LDS ground truth of every setting (cached; built when missing)."""
    from etda.experiment import build_ground_truth
    from etda.settings import get_setting
    from etda.zoo import trained_models

    out = {}
    for name in settings:
        setting = get_setting(name)
        t0 = time.perf_counter()
        tms = trained_models(setting, n_models, models_dir, progress=True)
        run = build_ground_truth(setting, lds_config, lds_dir, executor, workers, progress=True)
        out[name] = {
            "models_trained_now": sum(not tm.cached for tm in tms),
            "ground_truth_jobs_trained_now": run.trained,
            "ground_truth_jobs": run.total,
            "prepare_s": time.perf_counter() - t0,
        }
        print(f"{name}: caches ready {json.dumps(out[name])}", flush=True)
    return out


def export_for_peers(setting_name: str, n_models: int, models_dir: Path, out: Path) -> dict:
    """The setting's data and 5 cached models for the traker side, in the format of
    ``benchmarks/peers/export.py`` (``data.npz``, ``model-<seed>.safetensors``, ``meta.json``
    with digests), for any architecture: ``meta["arch"]`` names the module tree, and each
    model's logits on the first test examples let the traker side check it rebuilt the very
    model etda attributes."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from etda.settings import get_setting
    from etda.zoo import trained_models

    digest = _load("peers_export", PEERS / "export.py").digest
    setting = get_setting(setting_name)
    data = setting.data()
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": data.x_train.numpy().astype(np.float32),
        "y_train": data.y_train.numpy().astype(np.int64),
        "x_test": data.x_test.numpy().astype(np.float32),
        "y_test": data.y_test.numpy().astype(np.int64),
    }
    np.savez(out / "data.npz", **arrays)
    models = []
    for tm in trained_models(setting, n_models, models_dir, progress=False):
        state = {k: v.detach().contiguous().cpu() for k, v in tm.model.state_dict().items()}
        path = out / f"model-{tm.seed}.safetensors"
        save_file(state, str(path))
        with torch.no_grad():
            logits = tm.model.eval()(data.x_test[:CHECK_ROWS]).double()
        models.append(
            {
                "seed": tm.seed,
                "file": path.name,
                "digest": digest({k: v.numpy() for k, v in state.items()}),
                "check_logits": logits.tolist(),
            }
        )
    kw = json.loads(json.dumps(dict(setting.model_kwargs)))  # tuples -> lists
    meta = {
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "arch": setting.model_name,
        "model_kwargs": kw,
        "data_digest": digest(arrays),
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "models": models,
    }
    if setting.model_name == "mlp":  # what run_peer.make_model reads
        meta["mlp"] = {
            "in_features": int(kw["in_features"]),
            "hidden": [int(h) for h in kw["hidden"]],
            "num_classes": int(kw["num_classes"]),
            "dropout": float(kw["dropout"]),
        }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------------------- traker side


def _resnet9(in_channels: int, num_classes: int, width: int, dropout: float):
    """The module tree of ``etda.models.resnet.ResNet9`` (same names: its state_dict loads
    unchanged), rebuilt here because the traker side never imports etda."""
    from torch import nn

    def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU())
        if pool:
            layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.block = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

        def forward(self, x):
            return x + self.block(x)

    class ResNet9(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.features = nn.Sequential(
                conv_bn(in_channels, w),
                conv_bn(w, 2 * w, pool=True),
                Residual(2 * w),
                conv_bn(2 * w, 4 * w, pool=True),
                conv_bn(4 * w, 8 * w, pool=True),
                Residual(8 * w),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
            )
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(8 * w, num_classes)

        def forward(self, x):
            return self.head(self.dropout(self.features(x)))

    return ResNet9()


def _peer_model(meta: dict, rp):
    if meta["arch"] == "mlp":
        return rp.MLP(**meta["mlp"])
    if meta["arch"] == "resnet9":
        kw = meta["model_kwargs"]
        return _resnet9(
            int(kw.get("in_channels", 1)),
            int(kw.get("num_classes", 10)),
            int(kw.get("width", 16)),
            float(kw.get("dropout", 0.0)),
        )
    raise SystemExit(f"the traker side has no module tree for architecture {meta['arch']!r}")


def peer_proj_dim(n_train: int) -> int:
    """traker's projection dimension for ``n_train`` training examples (see PROJ_DIM)."""
    return PROJ_DIM if n_train >= 2 * PROJ_DIM else PEER_SMALL_PROJ_DIM


def _traker_scores(traker_cls, model, states, data, device: str, save_dir: Path, **kw):
    """traker's TRAK of ``data``'s test set on the models ``states``: (n_train, n_test)
    scores (positive = helps) and the TRAKer (its projector is recorded)."""
    import shutil

    shutil.rmtree(save_dir, ignore_errors=True)
    n_train, n_test = len(data["y_train"]), len(data["y_test"])
    traker = traker_cls(
        model=model,
        task="image_classification",
        train_set_size=n_train,
        save_dir=str(save_dir),
        device=device,
        logging_level=40,  # errors only (e.g. "Could not use CudaProjector" without fast_jl)
        **kw,
    )
    for model_id, state in enumerate(states):
        model.load_state_dict(state)
        model.eval()
        traker.load_checkpoint(model.state_dict(), model_id=model_id)
        for i in range(0, n_train, PEER_BATCH):
            xb = data["x_train"][i : i + PEER_BATCH].to(device)
            yb = data["y_train"][i : i + PEER_BATCH].to(device)
            traker.featurize(batch=(xb, yb), num_samples=len(yb))
    traker.finalize_features()
    for model_id, state in enumerate(states):
        model.load_state_dict(state)
        model.eval()
        traker.start_scoring_checkpoint(
            exp_name="test", checkpoint=model.state_dict(), model_id=model_id, num_targets=n_test
        )
        for i in range(0, n_test, PEER_BATCH):
            xb = data["x_test"][i : i + PEER_BATCH].to(device)
            yb = data["y_test"][i : i + PEER_BATCH].to(device)
            traker.score(batch=(xb, yb), num_samples=len(yb))
    scores = traker.finalize_scores(exp_name="test")
    _sync(device)
    shutil.rmtree(save_dir, ignore_errors=True)
    return scores, traker


def run_peer_side(
    name: str,
    device: str,
    work: Path,
    threads: int | None,
    proj_dim: int | None = None,
    repeats: int = 1,
    warmup: int = 0,
) -> dict:
    """One traker configuration (``--peer NAME``, the peers' interpreter): scores to
    ``<work>/scores/<name>.npy``, time and memory on stdout. Never imports etda."""
    check_device(device)
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    import torch._dynamo  # noqa: F401  (imported before the timer, as on etda's side)
    from trak import TRAKer

    rp = _load("peers_run_peer", PEERS / "run_peer.py")  # load_inputs, MLP, versions
    n_models = PEER_CONFIGS[name][0]
    torch.manual_seed(0)
    meta, data, states = rp.load_inputs(work, n_models, None)
    model = _peer_model(meta, rp).to(device)
    xs = data["x_test"][:CHECK_ROWS].to(device)
    for rec, state in zip(meta["models"], states, strict=False):  # the very models etda has
        model.load_state_dict(state)
        with torch.no_grad():
            got = model.eval()(xs).double().cpu()
        want = torch.tensor(rec["check_logits"], dtype=torch.float64)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"model seed {rec['seed']}: rebuilt model's logits differ from etda's")
    proj_dim = proj_dim or peer_proj_dim(len(data["y_train"]))
    cuda = torch.device(device).type == "cuda"
    half = cuda  # TRAKer's default (fp16); on a CPU float32 (fp16 is ~30x slower there)
    if cuda:
        torch.zeros(1, device=device)
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        scores, traker = _traker_scores(
            TRAKer,
            model,
            states,
            data,
            device,
            work / f"trak-{name}",
            proj_dim=proj_dim,
            use_half_precision=half,
        )
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    values = np.asarray(scores, dtype=np.float32).T.copy()  # etda's (n_test, n_train)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    np.save(work / "scores" / f"{name}.npy", values)
    if "etda" in sys.modules:
        raise SystemExit("the traker side imported etda")
    return {
        "setting": meta["setting"],
        "name": name,
        "library": "traker",
        "what": PEER_CONFIGS[name][2],
        "method": "trak",
        "ensemble": "none",
        "models": n_models,
        "members": n_models,
        "projection": type(traker.projector).__name__,
        "proj_dim": proj_dim,
        "use_half_precision": half,
        "wall_s": statistics.median(times),
        "wall_runs_s": times,
        "repeats": repeats,
        "warmup": warmup,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "finite": bool(np.isfinite(values).all()),
        "shape": list(values.shape),
        "versions": rp.versions(),
        **device_info(device),
    }


PROBE = """
import json, sys, importlib.util
out = {"python": sys.version.split()[0], "executable": sys.executable}
import torch
out.update(torch=torch.__version__, cuda_build=torch.version.cuda,
           cuda=torch.cuda.is_available())
import trak
out.update(traker=getattr(trak, "__version__", None),
           fast_jl=importlib.util.find_spec("fast_jl") is not None,
           safetensors=importlib.util.find_spec("safetensors") is not None)
print(json.dumps(out))
"""


def peer_env(peers_path: str | None) -> dict:
    """The traker side's environment: nothing of etda's on its path (only ``peers_path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if peers_path:
        env["PYTHONPATH"] = str(Path(peers_path).resolve())
    return env


def probe_peers(python: str, peers_path: str | None, device: str) -> tuple[dict, str | None]:
    """What the peers' interpreter has, and why traker cannot run there (None: it can)."""
    import torch

    hint = (
        "build it with `bash benchmarks/peers/setup.sh`, or pass --peers-python PY (and "
        "--peers-path DIR holding the `trak` package) for an interpreter with traker"
    )
    if not Path(python).exists() and not _which(python):
        return {"python": python}, f"the peers' interpreter {python} does not exist: {hint}"
    try:
        proc = subprocess.run(
            [python, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=300,
            env=peer_env(peers_path),
            cwd=ROOT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"python": python}, f"the peers' interpreter {python} did not start: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"python": python}, f"{python} cannot import torch and traker ({last}): {hint}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["safetensors"]:
        return info, f"{python} has traker but no safetensors (run_peer.py reads the models)"
    if torch.device(device).type == "cuda" and not info["cuda"]:
        return info, (
            f"the peers' torch {info['torch']} at {python} has no CUDA (setup.sh installs the "
            "CPU wheel), so traker cannot run on the GPU; pass --peers-python (and "
            "--peers-path) for an interpreter with a CUDA torch and traker"
        )
    return info, None


def _which(cmd: str) -> str | None:
    import shutil

    return shutil.which(cmd)


# ----------------------------------------------------------------------------- driver


def _child(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one configuration's process; its last stdout line is its JSON row."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path.cwd()
        )
    except subprocess.TimeoutExpired as e:
        log.write_text(f"{cmd}\n{e.stdout or ''}\n{e.stderr or ''}")
        return {"error": f"timed out after {timeout:.0f} s", "process_s": timeout}
    log.write_text(f"{' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    process_s = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": tail[:300], "process_s": process_s, "log": str(log)}
    return {**json.loads(lines[-1]), "process_s": process_s}


def _child_env() -> dict:
    """etda's side: this repository importable (``-m benchmarks.gpu``) from any folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _pairs(rows: list[dict]) -> list[dict]:
    """etda's configuration next to traker's, per setting, with the etda/traker ratios."""
    by = {(r["setting"], r["name"]): r for r in rows}
    out = []
    for (setting, name), p in by.items():
        if p.get("library") != "traker" or name not in PEER_CONFIGS:
            continue
        for partner in PEER_CONFIGS[name][1]:
            e = by.get((setting, partner))
            if e is None or "wall_s" not in e or "wall_s" not in p:  # failed or skipped
                continue
            pair = {"setting": setting, "etda": e["name"], "traker": name}
            pair |= {"k_etda": e.get("proj_dim"), "k_traker": p.get("proj_dim")}
            pair["time_ratio_etda_over_traker"] = e["wall_s"] / p["wall_s"]
            if e.get("peak_gpu_mb") and p.get("peak_gpu_mb"):
                pair["gpu_memory_ratio_etda_over_traker"] = e["peak_gpu_mb"] / p["peak_gpu_mb"]
            pair["lds_etda"], pair["lds_traker"] = e["lds"], p["lds"]
            out.append(pair)
    return out


def _num(r: dict, key: str, digits: int = 1) -> str:
    v = r.get(key)
    return "–" if v is None else f"{v:.{digits}f}"


def table(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    dev = meta["device"]
    peers = meta["peers"]
    timing = "a single run" if meta["repeats"] == 1 else f"the median of {meta['repeats']} runs"
    if meta.get("warmup"):
        timing += f" after {meta['warmup']} untimed run(s) in the same process"
    lines = [
        "# etda on a GPU, next to TRAK's own library (traker) on the same GPU",
        "",
        f"Measured {meta['date']} with `{meta['command']}` on **{dev['device_name']}** "
        f"(device `{dev['device']}`, torch {dev['torch']}, CUDA {dev['cuda']}, cuDNN "
        f"{dev['cudnn']}), {meta['cpus']} CPUs, {meta['threads'] or 'default'} torch threads; "
        f"etda {meta['etda']}. One configuration per process, one after the other, on the "
        f"settings' cached trained models; LDS over {meta['lds']['n_subsets']} retrained "
        f"subsets of {meta['lds']['fraction']:g} of the training set (the cached ground "
        "truth of each setting, the same for both libraries).",
        "",
        f"*wall s*: {timing} of the whole attribution call, after the data were decoded, the "
        "cached models read, the CUDA context made and torch._dynamo imported: etda's "
        "`run_attribution(..., "
        f"attribute_options={{'device': ..., 'memory_budget': '{BUDGET}'}})`, traker's "
        "TRAKer construction, featurize, finalize and score; *peak GPU MB*: "
        "`torch.cuda.max_memory_allocated` of the configuration's own process, reset before "
        "it; *peak RSS MB*: the whole process. etda's features come back to the host for the "
        "store and scoring (*featurize s* / *score s* split its time).",
        "",
    ]
    if not any(r["library"] == "traker" for r in rows):
        pass
    elif peers.get("skipped"):
        lines += [f"**traker rows skipped**: {peers['skipped']}", ""]
    else:
        lines += [
            f"traker {peers.get('traker')} from `{peers.get('python_path')}` (torch "
            f"{peers.get('torch')}, CUDA {peers.get('cuda_build')}, fast_jl "
            f"{'installed' if peers.get('fast_jl') else 'not installed: BasicProjector'}), "
            f"defaults (use_half_precision=True on a GPU, False on a CPU) except proj_dim: "
            f"{PROJ_DIM} where n_train >= {2 * PROJ_DIM}, else {PEER_SMALL_PROJ_DIM} (traker's "
            "solve is undamped, lambda_reg=0, and its X^T X is singular when k > n_train).",
            "",
        ]
    for setting in meta["settings"]:
        lines += [
            f"## {setting}",
            "",
            "| configuration | what | LDS ± s.e. | wall s | peak GPU MB | peak RSS MB "
            "| featurize s | score s | features |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["setting"] != setting:
                continue
            what = r.get("what", "")
            if "skipped" in r:
                lines.append(f"| {r['name']} | {what} | skipped: {r['skipped']} |" + " |" * 6)
                continue
            if "error" in r:
                lines.append(f"| {r['name']} | {what} | failed: {r['error']} |" + " |" * 6)
                continue
            feats = r.get("projection", "")
            if r.get("proj_dim"):
                feats += f" k={r['proj_dim']}"
            if r.get("use_half_precision"):
                feats += " fp16"
            if r.get("note"):
                feats += f" ({r['note']})"
            lines.append(
                f"| {r['name']} | {what} | {r['lds']:.3f} ± {r['sem']:.3f} | {r['wall_s']:.2f} "
                f"| {_num(r, 'peak_gpu_mb', 0)} | {_num(r, 'peak_rss_mb', 0)} "
                f"| {_num(r, 'featurize_s', 2)} | {_num(r, 'score_s', 2)} | {feats} |"
            )
        lines.append("")
    pairs = payload["pairs"]
    if pairs:
        lines += [
            "## etda / traker",
            "",
            "| setting | etda (k) | traker (k) | LDS etda | LDS traker | etda/traker time "
            "| etda/traker peak GPU memory |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in pairs:
            mem = p.get("gpu_memory_ratio_etda_over_traker")
            lines.append(
                f"| {p['setting']} | {p['etda']} ({p['k_etda'] or 'exact'}) "
                f"| {p['traker']} ({p['k_traker']}) | {p['lds_etda']:.3f} "
                f"| {p['lds_traker']:.3f} | {p['time_ratio_etda_over_traker']:.2f} "
                f"| {'–' if mem is None else f'{mem:.2f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--fast", action="store_true", help="tiny CPU-sized check (see the doc)")
    ap.add_argument("--prepare", action="store_true", help="build the caches only, then stop")
    ap.add_argument("--settings", nargs="+", help=f"default {' '.join(SETTINGS)}")
    ap.add_argument("--only", nargs="+", choices=ALL_NAMES, help="configurations to run")
    ap.add_argument("--work", type=Path, help="caches (--fast), exported inputs, scores, logs")
    ap.add_argument("--out", type=Path, help="where gpu.json/gpu.md go")
    ap.add_argument("--threads", type=int, help="torch threads per process (default torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs before the timed ones")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--workers", type=int, help="ground-truth training processes")
    ap.add_argument("--peers-python", default=os.environ.get("PEERS_PYTHON", str(DEFAULT_PEER_PY)))
    ap.add_argument("--peers-path", help="PYTHONPATH of the traker side (e.g. a copied trak/)")
    ap.add_argument("--no-peers", action="store_true", help="skip the traker rows")
    ap.add_argument("--traker-proj-dim", type=int, help="traker's k (default: see PROJ_DIM)")
    # internal: one configuration per process
    ap.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--peer", choices=sorted(PEER_CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lds-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n-subsets", type=int, default=50, help=argparse.SUPPRESS)
    ap.add_argument("--peer-work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")

    if args.peer:  # the traker side: the peers' interpreter, no etda
        row = run_peer_side(
            args.peer,
            args.device,
            args.peer_work,
            args.threads,
            args.traker_proj_dim,
            args.repeats,
            args.warmup,
        )
        print(json.dumps(row))
        return
    if args.one:
        row = run_one(
            args.one,
            args.setting,
            args.device,
            args.models_dir,
            args.lds_dir,
            args.n_subsets,
            args.threads,
            args.repeats,
            args.warmup,
        )
        print(json.dumps(row))
        return

    if not args.prepare:
        check_device(args.device)  # before any training or export
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from etda import __version__ as etda_version
    from etda.evaluate.lds import LDSConfig, lds
    from etda.experiment import build_ground_truth
    from etda.settings import get_setting

    if args.fast:
        work = (args.work or Path(tempfile.mkdtemp(prefix="etda-gpu-fast-"))).resolve()
        models_dir, lds_dir = work / "models", work / "lds-cache"
        out_dir = (args.out or work).resolve()
        lds_config = LDSConfig(n_subsets=4)
        settings = args.settings or [FAST_SETTING]
        names = args.only or list(FAST_CONFIGS)
        executor = "inprocess"
    else:
        work = (args.work or PEERS / "work" / "gpu").resolve()
        models_dir, lds_dir = ROOT / "runs" / "models", ROOT / "runs" / "lds-cache"
        out_dir = (args.out or RESULTS).resolve()
        lds_config = LDSConfig()
        settings = args.settings or list(SETTINGS)
        names = args.only or list(ALL_NAMES)
        executor = "process"
    for s in settings:
        get_setting(s)  # unknown names fail here
    print(f"work folder {work}; results to {out_dir}", flush=True)
    peer_names = [n for n in names if n in PEER_CONFIGS]
    peers_info: dict = {"python_path": args.peers_python}
    skipped = None
    if args.no_peers:
        skipped = "--no-peers was given"
    elif peer_names and not args.prepare:  # said before anything is trained or measured
        info, skipped = probe_peers(args.peers_python, args.peers_path, args.device)
        peers_info |= info
    if skipped and peer_names:
        print(f"traker rows SKIPPED: {skipped}", flush=True)
    peers_info["skipped"] = skipped
    k = n_models(ALL_NAMES if args.prepare else names)
    prepared = prepare(settings, k, lds_config, models_dir, lds_dir, executor, args.workers)
    if args.prepare or (peer_names and not skipped):
        for s in settings:
            export_for_peers(s, k, models_dir, work / "peers" / s)
    if args.prepare:
        print(f"caches ready; nothing measured (--prepare); traker inputs in {work / 'peers'}")
        return

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.gpu "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_info(args.device),
        "etda": etda_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_budget": BUDGET,
        "lds": lds_config.to_dict(),
        "fast": args.fast,
        "settings": settings,
        "peers": peers_info,
        "prepared": prepared,
        "load_before": os.getloadavg(),
    }
    json_path, md_path = out_dir / "gpu.json", out_dir / "gpu.md"
    kept: list[dict] = []
    if bool(args.only or args.settings) and not args.fast and json_path.exists():
        earlier = json.loads(json_path.read_text())  # a partial run keeps the other rows
        kept = earlier["rows"]
        meta["settings"] = list(dict.fromkeys([*earlier["meta"]["settings"], *settings]))
        meta["earlier_runs"] = earlier["meta"].get("earlier_runs", []) + [earlier["meta"]]
    gts = {
        s: build_ground_truth(s, lds_config, lds_dir, executor, progress=False).gt for s in settings
    }
    rows: list[dict] = []
    # configuration by configuration, each on every setting: the pairs with traker first, the
    # costliest last, and the results written after every row (a run stopped at a time limit
    # leaves what it measured)
    for name in sorted(names, key=RUN_ORDER.index):
        for s in settings:
            row = _measure(name, s, args, work, models_dir, lds_dir, lds_config, skipped)
            if name in PEER_CONFIGS and "error" not in row and "skipped" not in row:
                import numpy as np

                values = np.load(work / "peers" / s / "scores" / f"{name}.npy")
                res = lds(values.astype(np.float64), gts[s])
                row |= {"lds": res.mean, "sem": res.sem}
            what = CONFIGS[name][-1] if name in CONFIGS else PEER_CONFIGS[name][2]
            rows.append(
                {"setting": s, "name": name, "library": _library(name), "what": what, **row}
            )
            print(json.dumps(_brief(rows[-1])), flush=True)
            meta["load_after"] = os.getloadavg()
            _write(json_path, md_path, meta, rows, kept)
    print(f"wrote {json_path} and {md_path}")


def _measure(name, s, args, work, models_dir, lds_dir, lds_config, skipped) -> dict:
    """One configuration on one setting, in its own process (or its skip reason)."""
    log = work / "logs" / f"{s}-{name}.log"
    timing = ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    timing += ["--threads", str(args.threads)] if args.threads else []
    if name in CONFIGS:
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--one", name, "--setting", s]
        cmd += ["--device", args.device, "--models-dir", str(models_dir)]
        cmd += ["--lds-dir", str(lds_dir), "--n-subsets", str(lds_config.n_subsets), *timing]
        return _child(cmd, log, args.timeout, _child_env())
    if skipped:
        return {"skipped": skipped}
    cmd = [args.peers_python, str(Path(__file__).resolve()), "--peer", name]
    cmd += ["--device", args.device, "--peer-work", str(work / "peers" / s), *timing]
    if args.traker_proj_dim:
        cmd += ["--traker-proj-dim", str(args.traker_proj_dim)]
    return _child(cmd, log, args.timeout, peer_env(args.peers_path))


def _write(json_path: Path, md_path: Path, meta: dict, rows: list[dict], kept: list[dict]):
    done = {(r["setting"], r["name"]) for r in rows}
    rows = [r for r in kept if (r["setting"], r["name"]) not in done] + rows
    order = {n: i for i, n in enumerate(ALL_NAMES)}
    rows.sort(key=lambda r: (meta["settings"].index(r["setting"]), order.get(r["name"], 99)))
    payload = {"meta": meta, "rows": rows, "pairs": _pairs(rows)}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1, default=float))
    md_path.write_text(table(payload))


def _library(name: str) -> str:
    return "traker" if name in PEER_CONFIGS else "etda"


def _brief(row: dict) -> dict:
    keys = ("setting", "name", "lds", "wall_s", "peak_gpu_mb", "peak_rss_mb", "error", "skipped")
    return {k: row[k] for k in keys if k in row}


if __name__ == "__main__":
    main()
