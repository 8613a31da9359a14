"""Peers side by side: TRAK (``traker``), dattri and kronfluence against etda on fmnist-mlp,
and kronfluence against etda on fmnist2-cnn and kjv-transformer.

Run with etda's environment from the repository root, after ``bash benchmarks/peers/setup.sh``:

    .venv/bin/python benchmarks/peers/compare.py            # everything (~45 min on 2 cores)
    .venv/bin/python benchmarks/peers/compare.py --reuse    # only configurations not yet run
    .venv/bin/python benchmarks/peers/compare.py --setting fmnist2-cnn     # kronfluence vs etda
    .venv/bin/python benchmarks/peers/compare.py --setting kjv-transformer

It (1) exports the data and the 5 cached trained models (``export.py``), (2) runs every peer
configuration (``run_peer.py``, peers' venv) and every etda configuration (this file,
``--etda CONFIG``) in its own subprocess, one after another, so each peak RSS belongs to one
configuration, (3) computes the LDS of every score file against etda's cached LDS ground
truth, and (4) writes ``benchmarks/peers/results.json`` and ``results.md`` and prints the
table. Scores and per-run JSON go to ``benchmarks/peers/work/scores/`` (gitignored).

With ``--setting fmnist2-cnn`` or ``--setting kjv-transformer`` the same steps run on that
setting (inputs and scores under ``work/<setting>/``) with the kronfluence configurations and
their etda partners (``SETTING_PEERS``, ``SETTING_ETDA``), and write
``results-<setting>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# the repository's runs/ holds the models and ground truth every configuration shares
os.environ.setdefault("ETDA_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "runs"))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = HERE / "work"
DEFAULT_SETTING = "fmnist-mlp"
# the setting this process works on (``--setting``): its exported inputs and its scores
SETTING = DEFAULT_SETTING
SETTING_WORK = WORK
SCORES = WORK / "scores"
PEER_PY = Path(os.environ.get("PEERS_PYTHON", HERE / ".venv-peers" / "bin" / "python"))
THREADS = 2
# dattri's IF (CG) costs ~1 s per test example here: it runs on the first 100 test examples
IF_N_TEST = 100
PEER_LIBRARIES = ("traker", "dattri", "kronfluence")

# etda configurations: name -> (models, attribute() keyword arguments, description).
# "ensemble": "checkpoints-5" = the 5 evenly spaced checkpoints of the seed-0 run as members.
ETDA = {
    "etda-trak-1": (1, {"method": "trak"}, "TRAK, 1 model, defaults"),
    "etda-trak-5": (5, {"method": "trak"}, "TRAK, 5 models, defaults"),
    "etda-trak-1-k512": (1, {"method": "trak", "proj_dim": 512}, "TRAK, 1 model, proj_dim 512"),
    "etda-trak-5-k512": (5, {"method": "trak", "proj_dim": 512}, "TRAK, 5 models, proj_dim 512"),
    "etda-graddot-1": (1, {"method": "graddot"}, "Grad-Dot, 1 model, defaults"),
    "etda-gradcos-1": (1, {"method": "gradcos"}, "Grad-Cos, 1 model, defaults"),
    "etda-if-1": (1, {"method": "if"}, "IF, 1 model, defaults"),
    "etda-trak-dropout-10": (
        1,
        {"method": "trak", "ensemble": "dropout-10"},
        "TRAK, 1 model x Dropout(members=10), defaults",
    ),
    "etda-if-kfac-1": (1, {"method": "if", "curvature": "kfac"}, "IF, K-FAC curvature, 1 model"),
    "etda-if-ekfac-1": (
        1,
        {"method": "if", "curvature": "ekfac"},
        "IF, EK-FAC curvature, 1 model",
    ),
    "etda-if-ekfac-5": (
        5,
        {"method": "if", "curvature": "ekfac"},
        "IF, EK-FAC curvature, 5 models",
    ),
    "etda-if-ekfac-ckpt5": (
        1,
        {"method": "if", "curvature": "ekfac", "ensemble": "checkpoints-5"},
        "IF, EK-FAC curvature, 5 checkpoints of one run",
    ),
    "etda-if-ekfac-empirical-1": (
        1,
        {"method": "if", "curvature": "ekfac", "fisher": "empirical"},
        "IF, EK-FAC curvature fitted at the true labels, 1 model",
    ),
    "etda-if-ckpt5": (
        1,
        {"method": "if", "ensemble": "checkpoints-5"},
        "IF (exact Gram, defaults), 5 checkpoints of one run",
    ),
}
MLP_ETDA = list(ETDA)  # the etda configurations of the fmnist-mlp table
ETDA |= {
    # the other settings (fmnist2-cnn, kjv-transformer): measure="output" differentiates the
    # test output the ground truth records (margin / sequence log-likelihood), as kronfluence's
    # measurement does here; "params": "kronfluence" keeps only the Linear/Conv2d parameters
    # kronfluence tracks
    "etda-if-output-1": (
        1,
        {"method": "if", "measure": "output"},
        "IF (exact Gram), test output measured, 1 model",
    ),
    "etda-if-kfac-output-1": (
        1,
        {"method": "if", "curvature": "kfac", "measure": "output"},
        "IF, K-FAC curvature, test output measured, 1 model",
    ),
    "etda-if-ekfac-output-1": (
        1,
        {"method": "if", "curvature": "ekfac", "measure": "output"},
        "IF, EK-FAC curvature, test output measured, 1 model",
    ),
    # etda's default memory_budget (2 GiB) refuses the dense EK-FAC / K-FAC features of the
    # transformer ("the scores ... do not fit the memory budget"); the same with 8 GB
    "etda-if-ekfac-output-1-8gb": (
        1,
        {"method": "if", "curvature": "ekfac", "measure": "output", "memory_budget": "8GB"},
        "IF, EK-FAC curvature, test output measured, memory_budget 8GB, 1 model",
    ),
    "etda-if-kfac-output-1-8gb": (
        1,
        {"method": "if", "curvature": "kfac", "measure": "output", "memory_budget": "8GB"},
        "IF, K-FAC curvature, test output measured, memory_budget 8GB, 1 model",
    ),
    "etda-if-ekfac-output-ckpt5-8gb": (
        1,
        {
            "method": "if",
            "curvature": "ekfac",
            "measure": "output",
            "ensemble": "checkpoints-5",
            "memory_budget": "8GB",
        },
        "IF, EK-FAC curvature, test output measured, memory_budget 8GB, 5 checkpoints of one run",
    ),
    "etda-if-ekfac-output-kfparams-1-8gb": (
        1,
        {
            "method": "if",
            "curvature": "ekfac",
            "measure": "output",
            "params": "kronfluence",
            "memory_budget": "8GB",
        },
        "IF, EK-FAC, test output measured, only kronfluence's modules, memory_budget 8GB, 1 model",
    ),
    "etda-if-ekfac-empirical-output-1": (
        1,
        {"method": "if", "curvature": "ekfac", "fisher": "empirical", "measure": "output"},
        "IF, EK-FAC curvature at the true labels, test output measured, 1 model",
    ),
    "etda-if-ekfac-output-kfparams-1": (
        1,
        {"method": "if", "curvature": "ekfac", "measure": "output", "params": "kronfluence"},
        "IF, EK-FAC, test output measured, only kronfluence's modules (Linear/Conv2d), 1 model",
    ),
    "etda-if-kfparams-1": (
        1,
        {"method": "if", "params": "kronfluence"},
        "IF (exact Gram), only kronfluence's modules (Linear/Conv2d), 1 model",
    ),
    "etda-if-5": (5, {"method": "if"}, "IF (exact Gram, defaults), 5 models"),
    "etda-if-output-5": (
        5,
        {"method": "if", "measure": "output"},
        "IF (exact Gram), test output measured, 5 models",
    ),
    "etda-if-ekfac-output-5": (
        5,
        {"method": "if", "curvature": "ekfac", "measure": "output"},
        "IF, EK-FAC curvature, test output measured, 5 models",
    ),
    "etda-if-output-ckpt5": (
        1,
        {"method": "if", "measure": "output", "ensemble": "checkpoints-5"},
        "IF (exact Gram), test output measured, 5 checkpoints of one run",
    ),
    "etda-if-ekfac-output-ckpt5": (
        1,
        {"method": "if", "curvature": "ekfac", "measure": "output", "ensemble": "checkpoints-5"},
        "IF, EK-FAC curvature, test output measured, 5 checkpoints of one run",
    ),
}
# configurations that need an etda option that may not exist yet (the curvature strategy):
# if etda raises on it, the run records "not available: <error>" instead of failing
OPTIONAL = {name for name, (_, kw, _) in ETDA.items() if "curvature" in kw}
# peer configuration -> (run_peer.py extra arguments, etda configurations to compare with)
PEERS = {
    "traker-trak-1": ([], ["etda-trak-1-k512", "etda-trak-1"]),
    "traker-trak-5": ([], ["etda-trak-5-k512", "etda-trak-5"]),
    "dattri-trak-1": ([], ["etda-trak-1-k512", "etda-trak-1"]),
    "dattri-trak-5": ([], ["etda-trak-5-k512", "etda-trak-5"]),
    "dattri-trak-dropout-10": ([], ["etda-trak-dropout-10"]),
    "dattri-graddot-1": ([], ["etda-graddot-1"]),
    "dattri-gradcos-1": ([], ["etda-gradcos-1"]),
    "dattri-if-cg-1": (["--n-test", str(IF_N_TEST), "--batch", "100"], ["etda-if-1"]),
    "kronfluence-kfac-1": ([], ["etda-if-kfac-1", "etda-if-1"]),
    "kronfluence-ekfac-1": ([], ["etda-if-ekfac-1", "etda-if-ekfac-empirical-1", "etda-if-1"]),
    "kronfluence-kfac-5": ([], ["etda-if-ekfac-5", "etda-if-ekfac-ckpt5", "etda-if-ckpt5"]),
    "kronfluence-ekfac-5": ([], ["etda-if-ekfac-5", "etda-if-ekfac-ckpt5", "etda-if-ckpt5"]),
    "kronfluence-identity-1": ([], ["etda-graddot-1"]),
}
# the kronfluence rows of the other settings and their etda partners
KF_PEERS = {
    "kronfluence-kfac-1": (
        [],
        ["etda-if-kfac-output-1", "etda-if-kfac-output-1-8gb", "etda-if-kfac-1", "etda-if-1"],
    ),
    "kronfluence-ekfac-1": (
        [],
        [
            "etda-if-ekfac-output-1",
            "etda-if-ekfac-output-1-8gb",
            "etda-if-ekfac-empirical-output-1",
            "etda-if-ekfac-output-kfparams-1",
            "etda-if-ekfac-output-kfparams-1-8gb",
            "etda-if-ekfac-1",
            "etda-if-1",
            "etda-if-output-1",
        ],
    ),
    "kronfluence-kfac-5": (
        [],
        ["etda-if-ekfac-output-5", "etda-if-ekfac-output-ckpt5", "etda-if-ckpt5"],
    ),
    "kronfluence-ekfac-5": (
        [],
        [
            "etda-if-ekfac-output-5",
            "etda-if-5",
            "etda-if-ekfac-output-ckpt5",
            "etda-if-ekfac-output-ckpt5-8gb",
            "etda-if-ckpt5",
            "etda-if-output-ckpt5",
        ],
    ),
    "kronfluence-identity-1": ([], ["etda-graddot-1"]),
}
# setting -> (peer configurations with their partners, etda configurations, title)
SETTING_PEERS = {"fmnist-mlp": PEERS, "fmnist2-cnn": KF_PEERS, "kjv-transformer": KF_PEERS}
_KF_ETDA = [
    "etda-if-1",
    "etda-if-output-1",
    "etda-if-kfparams-1",
    "etda-if-kfac-1",
    "etda-if-kfac-output-1",
    "etda-if-ekfac-1",
    "etda-if-ekfac-output-1",
    "etda-if-ekfac-output-1-8gb",
    "etda-if-kfac-output-1-8gb",
    "etda-if-ekfac-empirical-1",
    "etda-if-ekfac-empirical-output-1",
    "etda-if-ekfac-output-kfparams-1",
    "etda-if-5",
    "etda-if-output-5",
    "etda-if-ekfac-output-5",
    "etda-if-ckpt5",
    "etda-if-output-ckpt5",
    "etda-if-ekfac-output-ckpt5",
    "etda-if-ekfac-output-ckpt5-8gb",
    "etda-if-ekfac-output-kfparams-1-8gb",
    "etda-graddot-1",
    "etda-trak-1",
]
SETTING_ETDA = {
    # fmnist-mlp: the configurations it always ran (results.md)
    "fmnist-mlp": MLP_ETDA,
    "fmnist2-cnn": _KF_ETDA,
    "kjv-transformer": _KF_ETDA,
}
TITLES = {
    "fmnist-mlp": "fmnist-mlp (MLP 784-128-128-10, 5000 train / 500 test)",
    "fmnist2-cnn": "fmnist2-cnn (ResNet-9 width 8, Fashion-MNIST T-shirt vs Shirt, "
    "2000 train / 200 test)",
    "kjv-transformer": "kjv-transformer (character transformer, 2 layers, d 64, on KJV "
    "windows of 64 characters, 2000 train / 200 test, next-token task)",
}


def use_setting(name: str) -> None:
    """Point this process at ``name``'s exported inputs and scores."""
    global SETTING, SETTING_WORK, SCORES
    sys.path.insert(0, str(HERE))
    from export import work_dir

    SETTING, SETTING_WORK = name, work_dir(name)
    SCORES = SETTING_WORK / "scores"


def results_stem(setting: str) -> str:
    return "results" if setting == DEFAULT_SETTING else f"results-{setting}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- etda side


def run_etda(name: str, out: Path) -> dict:
    """One etda configuration in this process (called as ``compare.py --etda NAME``)."""
    import torch

    torch.set_num_threads(THREADS)
    import etda
    from etda.settings import get_setting

    n_models, kw, desc = ETDA[name]
    kw = dict(kw)
    setting = get_setting(SETTING)
    data = setting.data()
    out.mkdir(parents=True, exist_ok=True)
    try:
        models, kw = _etda_models(etda, setting, n_models, kw)
        t0 = time.perf_counter()
        s = etda.attribute(models, (data.x_train, data.y_train), (data.x_test, data.y_test), **kw)
        wall = time.perf_counter() - t0
    except (TypeError, ValueError, NotImplementedError, KeyError) as exc:
        if name not in OPTIONAL:
            raise
        # this etda does not have the option yet (or rejects it): a row, not a failed run
        result = {"config": name, "library": "etda", "description": desc, "models": n_models}
        result["error"] = f"not available: {type(exc).__name__}: {exc}"
        result["versions"] = {"etda": etda.__version__, "torch": torch.__version__}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return result
    values = np.asarray(s.values, dtype=np.float32)
    np.save(out / f"{name}.npy", values)
    result = {
        "config": name,
        "library": "etda",
        "setting": SETTING,
        "description": desc,
        "models": n_models,
        "members": len(models),
        "n_test": int(values.shape[0]),
        "threads": THREADS,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "finite": bool(np.isfinite(values).all()),
        "projection": s.config.get("projection"),
        "coverage": _etda_coverage(models[0], kw),
        "versions": {"etda": etda.__version__, "torch": torch.__version__},
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("config", "wall_s", "peak_rss_mb", "finite")}))
    return result


def _etda_models(etda, setting, n_models: int, kw: dict) -> tuple[list, dict]:
    """The modules to attribute (checked against the exported weights) and the keyword
    arguments with the ensemble built. Models come from etda's cache (trained on first use),
    before the timer starts."""
    from etda.zoo import trained_models

    ensemble = kw.get("ensemble")
    if kw.get("params") == "kronfluence":  # the parameters kronfluence tracks
        m = trained_models(setting, 1, progress=False)[0].model
        kw["params"] = _linear_conv_params(m)
    if ensemble == "dropout-10":
        kw["ensemble"] = etda.Dropout(members=10)
    if ensemble == "checkpoints-5":
        from etda.experiment import prepare_models

        ens = etda.Checkpoints(members=5)
        # seed 0's run with 5 evenly spaced checkpoints (retrained once if the cached model
        # lacks them); the members are the checkpoints, the last one is the final model
        tms, models, extra = prepare_models(setting, kw["method"], ens, n_models, 5, progress=False)
        if extra:
            raise SystemExit(f"{kw['method']} with checkpoint members asks for {sorted(extra)}")
        _check_same_models([tm.model for tm in tms])
        kw["ensemble"] = ens
        return models, kw
    models = [tm.model for tm in trained_models(setting, n_models, progress=False)]
    _check_same_models(models)
    return models, kw


def _linear_conv_params(model) -> list[str]:
    """Names of the parameters of the model's Linear and Conv2d modules (kronfluence 1.0.1's
    supported module types; everything else it leaves out of the influence)."""
    from torch import nn

    return [
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.Linear | nn.Conv2d)
        for p_name, _ in mod.named_parameters(recurse=False)
    ]


def _etda_coverage(model, kw: dict) -> dict:
    """Which parameters this etda run attributes, and how its curvature treats them."""
    from torch import nn

    params = dict(model.named_parameters())
    chosen = kw.get("params", "all")
    names = list(params) if chosen == "all" else [n for n in params if n in chosen]
    kron = set(_linear_conv_params(model))
    curvature = kw.get("curvature", "gram")
    types = {type(m).__name__ for m in model.modules() if not list(m.children())}
    return {
        "params": len(names),
        "attributed_params": sum(params[n].numel() for n in names),
        "total_params": sum(p.numel() for p in params.values()),
        "kronecker_factored": sum(params[n].numel() for n in names if n in kron)
        if curvature != "gram"
        else 0,
        "other_params": sorted(n for n in names if n not in kron),
        "curvature_of_others": "diagonal Fisher" if curvature != "gram" else "exact Gram",
        "leaf_module_types": sorted(types - {nn.Sequential.__name__}),
    }


def _check_same_models(models) -> None:
    """The etda side must attribute the very weights the peers got (export.py digests)."""
    sys.path.insert(0, str(HERE))
    from export import digest

    meta = json.loads((SETTING_WORK / "meta.json").read_text())
    for m, rec in zip(models, meta["models"], strict=False):
        got = digest({k: v.detach().cpu().numpy() for k, v in m.state_dict().items()})
        if got != rec["digest"]:
            raise SystemExit(f"model seed {rec['seed']} differs from the exported one; re-export")


# ----------------------------------------------------------------------------- driver


def _run(cmd: list[str], name: str, timeout: float) -> dict:
    log = SCORES / f"{name}.log"
    load = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    elapsed = time.perf_counter() - t0
    status = {
        "rc": rc,
        "process_s": elapsed,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "log": str(log.name),
    }
    res_path = SCORES / f"{name}.json"
    if rc == 0 and res_path.exists():
        res = json.loads(res_path.read_text())
        res.update(status)
        res_path.write_text(json.dumps(res, indent=1))
        if "error" in res:  # an optional configuration this etda cannot run yet
            print(f"  {name}: {res['error']}", flush=True)
            return res
        print(f"  {name}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        return res
    tail = log.read_text().strip().splitlines()[-5:]
    print(f"  {name}: FAILED ({rc}): {' | '.join(tail)}", flush=True)
    failed = {"config": name, "error": f"rc={rc}", "log_tail": tail, **status}
    partial = SCORES / f"{name}.partial.json"  # a multi-model peer run stopped by the timeout
    if rc == "timeout" and partial.exists() and partial.stat().st_mtime > time.time() - elapsed:
        failed["partial"] = json.loads(partial.read_text())
    return failed


def run_all(names: list[str], reuse: bool, timeout: float) -> dict:
    SCORES.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in names:
        path = SCORES / f"{name}.json"
        if reuse and path.exists() and (SCORES / f"{name}.npy").exists():
            runs[name] = json.loads(path.read_text())
            print(f"  {name}: reused", flush=True)
            continue
        if name in ETDA:
            cmd = [sys.executable, str(Path(__file__)), "--etda", name, "--setting", SETTING]
        else:
            extra = SETTING_PEERS[SETTING][name][0]
            cmd = [str(PEER_PY), str(HERE / "run_peer.py"), name, "--threads", str(THREADS)]
            cmd += ["--work", str(SETTING_WORK), "--out", str(SCORES), *extra]
        runs[name] = _run(cmd, name, timeout)
    return runs


def score_all(runs: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from etda.evaluate.lds import LDSConfig, ground_truth, lds
    from etda.settings import get_setting

    setting = get_setting(SETTING)
    gt = ground_truth(setting, LDSConfig(), cache_dir="runs/lds-cache")
    out = {}
    for name, r in runs.items():
        if "error" in r:
            if "partial" in r:  # the mean over the models finished before the timeout
                res = lds(np.load(SCORES / f"{name}.partial.npy").astype(np.float64), gt)
                r = dict(r, partial=dict(r["partial"], lds=res.mean, lds_sem=res.sem))
            out[name] = r
            continue
        values = np.load(SCORES / f"{name}.npy").astype(np.float64)
        n = values.shape[0]
        g = gt if n == gt.outputs.shape[1] else dataclasses.replace(gt, outputs=gt.outputs[:, :n])
        res = lds(values, g)
        r = dict(r, lds=res.mean, lds_sem=res.sem)
        if name in ETDA:  # the same test subset as any peer run on fewer test examples
            for k in sorted({len_ for len_ in _subset_sizes() if len_ < n}):
                sub = lds(values[:k], dataclasses.replace(gt, outputs=gt.outputs[:, :k]))
                r[f"lds_first{k}"], r[f"lds_first{k}_sem"] = sub.mean, sub.sem
        out[name] = r
    return out


def _subset_sizes() -> list[int]:
    sizes = []
    for extra, _ in SETTING_PEERS[SETTING].values():
        if "--n-test" in extra:
            sizes.append(int(extra[extra.index("--n-test") + 1]))
    return sizes


# ----------------------------------------------------------------------------- report


def _fmt_lds(r: dict, n: int | None = None) -> str:
    if "error" in r:
        if r["error"] == "rc=timeout":
            part = r.get("partial")
            if part and "lds" in part:
                return (
                    f"timed out (> {r.get('process_s', 0):.0f} s); its first "
                    f"{part['models_done']} models' mean ({part['wall_s']:.0f} s): "
                    f"{part['lds']:.3f} ± {part['lds_sem']:.3f}"
                )
            return f"timed out (> {r.get('process_s', 0):.0f} s)"
        return "not available" if str(r["error"]).startswith("not available") else "failed"
    if n is not None and r.get("n_test") != n and f"lds_first{n}" in r:
        return f"{r[f'lds_first{n}']:.3f} ± {r[f'lds_first{n}_sem']:.3f}"
    return f"{r['lds']:.3f} ± {r['lds_sem']:.3f}"


def _lds_value(r: dict, n: int | None = None) -> float:
    if n is not None and r.get("n_test") != n and f"lds_first{n}" in r:
        return r[f"lds_first{n}"]
    return r["lds"]


def table(results: dict) -> str:
    peers, etda_names = SETTING_PEERS[SETTING], SETTING_ETDA[SETTING]
    lines = [
        "| peer configuration | peer LDS ± s.e. | peer wall s | peer peak RSS MB "
        "| etda configuration | etda LDS ± s.e. | etda wall s | etda peak RSS MB "
        "| LDS peer/etda | wall peer/etda | RSS peer/etda |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for peer, (_, partners) in peers.items():
        p = results.get(peer)
        if p is None:
            continue
        if not any(partner in results for partner in partners):  # no partner was run
            lines.append(
                f"| {peer} | {_fmt_lds(p)} | {_num(p, 'wall_s')} | {_num(p, 'peak_rss_mb', 0)} "
                f"| {' / '.join(partners)} (not run) | – | – | – | – | – | – |"
            )
        for partner in partners:
            e = results.get(partner)
            if e is None:
                continue
            n = p.get("n_test")
            full = max((r.get("n_test") or 0) for r in results.values())
            note = f" (first {n} test)" if n and n < full else ""
            if "error" in p or "error" in e:
                ratios = ["–"] * 3
            else:
                ratios = [
                    f"{_lds_value(p) / _lds_value(e, n):.2f}",
                    f"{p['wall_s'] / e['wall_s']:.1f}",
                    f"{p['peak_rss_mb'] / e['peak_rss_mb']:.1f}",
                ]
            lines.append(
                f"| {peer}{note} | {_fmt_lds(p)} | {_num(p, 'wall_s')} "
                f"| {_num(p, 'peak_rss_mb', 0)} "
                f"| {partner} | {_fmt_lds(e, n)} | {_num(e, 'wall_s')} "
                f"| {_num(e, 'peak_rss_mb', 0)} | {' | '.join(ratios)} |"
            )
    lines += [
        "",
        "| etda configuration | what | LDS ± s.e. | wall s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name in [*etda_names, *(n for n in ETDA if n not in etda_names)]:
        e = results.get(name)
        if e is not None:
            lines.append(
                f"| {name} | {ETDA[name][2]} | {_fmt_lds(e)} | {_num(e, 'wall_s')} "
                f"| {_num(e, 'peak_rss_mb', 0)} |"
            )
    return "\n".join(lines)


def coverage_section(results: dict) -> str:
    """Which modules / parameters each library attributes (from the runs' records)."""
    lines = ["## Parameters each library covers", ""]
    kf = next(
        (
            r["coverage"]
            for r in results.values()
            if r.get("library") == "kronfluence" and "coverage" in r
        ),
        None,
    )
    if kf is not None:
        lines.append(
            f"- **kronfluence** tracks {len(kf['tracked_modules'])} modules "
            f"({', '.join(kf['tracked_types'])}), {kf['tracked_params']:,} of the model's "
            f"{kf['total_params']:,} parameters; it leaves out "
            + _modules(kf["untracked_params"])
            + " (no influence through them at all)."
        )
    seen = set()
    for name, r in results.items():
        cov = r.get("coverage") if r.get("library") == "etda" else None
        if not cov:
            continue
        key = (cov["attributed_params"], cov["kronecker_factored"], cov["curvature_of_others"])
        if key in seen:
            continue
        seen.add(key)
        others = cov["other_params"]
        what = (
            f"{cov['kronecker_factored']:,} in Kronecker-factored Linear/Conv2d layers, the "
            f"other {len(others)} tensors with the {cov['curvature_of_others']}"
            if cov["kronecker_factored"]
            else f"all with the {cov['curvature_of_others']}"
        )
        lines.append(
            f"- **etda** `{name}` (and the runs with the same parameters): "
            f"{cov['attributed_params']:,} of {cov['total_params']:,} parameters ({what})"
            + (f"; beyond kronfluence's: {_modules(others)}" if others else "")
            + "."
        )
    return "\n".join(lines)


def _modules(param_names: list[str]) -> str:
    """Parameter names grouped by module: ``features.0.1 (bias, weight)``."""
    mods: dict[str, list[str]] = {}
    for n in param_names:
        mod, _, leaf = n.rpartition(".")
        mods.setdefault(mod, []).append(leaf)
    if not mods:
        return "nothing"
    return f"{len(param_names)} tensors of {len(mods)} modules: " + ", ".join(
        f"`{m}` ({'/'.join(sorted(leaves))})" for m, leaves in mods.items()
    )


def _best(results: dict, names) -> tuple[str, dict] | None:
    ok = [(n, results[n]) for n in names if n in results and "lds" in results[n]]
    # the highest LDS; among equal LDS (to 4 decimals) the fastest
    return max(ok, key=lambda nr: (round(nr[1]["lds"], 4), -nr[1]["wall_s"])) if ok else None


def targets_section(results: dict) -> str:
    """The two targets, read off the measured rows."""
    one = [n for n, r in results.items() if r.get("models") == 1 and r.get("members", 1) == 1]
    kf1 = _best(results, [n for n in one if n.startswith("kronfluence-") and "identity" not in n])
    e1 = _best(results, [n for n in one if n.startswith("etda-if")])
    kf5 = _best(results, ["kronfluence-kfac-5", "kronfluence-ekfac-5"])
    ck = _best(results, [n for n in results if n.startswith("etda-") and n.endswith("ckpt5")])
    lines = ["## Targets", ""]
    if kf1 and e1:
        (kn, k), (en, e) = kf1, e1
        # met when some one-model etda run reaches kronfluence's best LDS in no more time
        win = [
            n
            for n in one
            if n.startswith("etda-if")
            and "lds" in results[n]
            and results[n]["lds"] >= k["lds"]
            and results[n]["wall_s"] <= k["wall_s"]
        ]
        lines.append(
            f"- (a) one trained model: best etda `{en}` {e['lds']:.3f} ± {e['lds_sem']:.3f} in "
            f"{e['wall_s']:.1f} s vs best kronfluence `{kn}` {k['lds']:.3f} ± "
            f"{k['lds_sem']:.3f} in {k['wall_s']:.1f} s: "
            + (f"**met** ({', '.join(f'`{n}`' for n in win)})" if win else "**not met**")
            + "."
        )
    if kf5 and ck:
        (kn, k), (en, e) = kf5, ck
        met = e["lds"] > k["lds"]
        lines.append(
            f"- (b) one training run + 5 checkpoints: best etda `{en}` {e['lds']:.3f} ± "
            f"{e['lds_sem']:.3f} ({e['wall_s']:.1f} s) vs kronfluence's 5-model `{kn}` "
            f"{k['lds']:.3f} ± {k['lds_sem']:.3f} ({k['wall_s']:.1f} s, plus 4 more trained "
            f"models): **{'met' if met else 'not met'}**."
        )
    elif ck:
        en, e = ck
        for kn in ("kronfluence-ekfac-5", "kronfluence-kfac-5"):
            k = results.get(kn)
            if k is None:
                continue
            lines.append(
                f"- (b) one training run + 5 checkpoints: best etda `{en}` {e['lds']:.3f} ± "
                f"{e['lds_sem']:.3f} ({e['wall_s']:.1f} s); kronfluence's `{kn}`: "
                f"{_fmt_lds(k)}: **not decided** (no complete 5-model run)."
            )
    return "\n".join(lines)


def write_setting_results(runs: dict, t0: float, load_start, load_end) -> None:
    """results-<setting>.json / .md for fmnist2-cnn and kjv-transformer (merged with the
    configurations an earlier invocation already recorded)."""
    path = HERE / f"{results_stem(SETTING)}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    scored = {**old.get("runs", {}), **score_all(runs)}
    invocation = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "configs": list(runs),
        "driver_s": time.time() - t0,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }
    peers_versions: dict = {}
    for r in scored.values():
        if r.get("library") in PEER_LIBRARIES:
            peers_versions.update({k: v for k, v in r.get("versions", {}).items() if v})
    payload = {
        "setting": SETTING,
        "date": invocation["date"],
        "threads": THREADS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "invocations": [*old.get("invocations", []), invocation],
        "peer_versions": peers_versions,
        "runs": scored,
    }
    path.write_text(json.dumps(payload, indent=1, default=float))
    loads = "; ".join(
        f"{inv['date']}: {_load(inv['loadavg_start'])} before, {_load(inv['loadavg_end'])} after "
        f"({len(inv['configs'])} configurations)"
        for inv in payload["invocations"]
    )
    md = table(scored)
    header = (
        f"# kronfluence and etda side by side on {TITLES[SETTING]}\n\n"
        f"`benchmarks/peers/compare.py --setting {SETTING}`, {THREADS} torch threads per "
        "process, one configuration per process, scored against etda's LDS ground truth of "
        "this setting (50 half-size subsets, `runs/lds-cache`). "
        f"Peers: {', '.join(f'{k} {v}' for k, v in peers_versions.items() if v)}. "
        "Wall s: the attribution call only; peak RSS: the whole process.\n\n"
        f"Load average (1, 5, 15 min) per invocation: {loads}.\n\n"
    )
    per_run = ", ".join(
        f"{n} {_load(r['loadavg_before'][:1])}→{_load(r['loadavg_after'][:1])}"
        for n, r in scored.items()
        if "loadavg_before" in r and "loadavg_after" in r
    )
    body = "\n\n".join(
        [
            md,
            coverage_section(scored),
            targets_section(scored),
            "## Load average per run (1 min, before → after)\n\n" + per_run,
        ]
    )
    (HERE / f"{results_stem(SETTING)}.md").write_text(header + body + "\n")
    print(md)


def _load(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _num(r: dict, key: str, digits: int = 1) -> str:
    return "–" if key not in r else f"{r[key]:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etda", choices=sorted(ETDA), help="(internal) run one etda config")
    parser.add_argument(
        "--setting",
        default=DEFAULT_SETTING,
        choices=sorted(SETTING_PEERS),
        help="fmnist-mlp (every peer) or fmnist2-cnn / kjv-transformer (kronfluence)",
    )
    parser.add_argument(
        "--only", nargs="*", choices=sorted([*PEERS, *ETDA]), help="configurations to run"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per config")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    use_setting(args.setting)
    if args.etda:
        run_etda(args.etda, SCORES)
        return
    if not PEER_PY.exists():
        raise SystemExit(f"{PEER_PY} missing: run `bash benchmarks/peers/setup.sh` first")
    if not args.no_export:
        export = [sys.executable, str(HERE / "export.py")]
        if SETTING != DEFAULT_SETTING:
            export += ["--setting", SETTING]
        subprocess.run(export, cwd=ROOT, check=True)
    names = args.only or [*SETTING_PEERS[SETTING], *SETTING_ETDA[SETTING]]
    unknown = [n for n in names if n not in SETTING_PEERS[SETTING] and n not in ETDA]
    if unknown:
        raise SystemExit(f"{', '.join(unknown)}: not a configuration of {SETTING}")
    t0 = time.time()
    load_start = os.getloadavg()
    runs = run_all(names, args.reuse, args.timeout)
    load_end = os.getloadavg()
    if SETTING != DEFAULT_SETTING:
        write_setting_results(runs, t0, load_start, load_end)
        return
    results_path = HERE / "results.json"
    old = json.loads(results_path.read_text())["runs"] if results_path.exists() else {}
    scored = {**old, **score_all(runs)}
    peers_versions: dict = {}  # every peer run's versions, this run's last (they win)
    for r in [*old.values(), *runs.values()]:
        if r.get("library") in PEER_LIBRARIES:
            peers_versions.update({k: v for k, v in r.get("versions", {}).items() if v})
    payload = {
        "setting": "fmnist-mlp",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": THREADS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "driver_s": time.time() - t0,
        "peer_versions": peers_versions,
        "runs": scored,
    }
    results_path.write_text(json.dumps(payload, indent=1, default=float))
    md = table(scored)
    header = (
        "# Peers side by side on fmnist-mlp (MLP 784-128-128-10, 5000 train / 500 test)\n\n"
        f"Measured {payload['date']} in one run of `benchmarks/peers/compare.py`, "
        f"{THREADS} torch threads per process, one configuration per process. "
        f"Peers: {', '.join(f'{k} {v}' for k, v in peers_versions.items() if v)}.\n\n"
    )
    (HERE / "results.md").write_text(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
