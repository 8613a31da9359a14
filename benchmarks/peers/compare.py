"""Peers side by side: TRAK (``traker``), dattri and kronfluence against etda on fmnist-mlp.

Run with etda's environment from the repository root, after ``bash benchmarks/peers/setup.sh``:

    .venv/bin/python benchmarks/peers/compare.py            # everything (~45 min on 2 cores)
    .venv/bin/python benchmarks/peers/compare.py --reuse    # only configurations not yet run

It (1) exports the data and the 5 cached trained models (``export.py``), (2) runs every peer
configuration (``run_peer.py``, peers' venv) and every etda configuration (this file,
``--etda CONFIG``) in its own subprocess, one after another, so each peak RSS belongs to one
configuration, (3) computes the LDS of every score file against etda's cached LDS ground
truth, and (4) writes ``benchmarks/peers/results.json`` and ``results.md`` and prints the
table. Scores and per-run JSON go to ``benchmarks/peers/work/scores/`` (gitignored).
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
    setting = get_setting("fmnist-mlp")
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
        "description": desc,
        "models": n_models,
        "members": len(models),
        "n_test": int(values.shape[0]),
        "threads": THREADS,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "finite": bool(np.isfinite(values).all()),
        "projection": s.config.get("projection"),
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


def _check_same_models(models) -> None:
    """The etda side must attribute the very weights the peers got (export.py digests)."""
    sys.path.insert(0, str(HERE))
    from export import digest

    meta = json.loads((WORK / "meta.json").read_text())
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
    status = {"rc": rc, "process_s": elapsed, "loadavg_before": load, "log": str(log.name)}
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
    return {"config": name, "error": f"rc={rc}", "log_tail": tail, **status}


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
            cmd = [sys.executable, str(Path(__file__)), "--etda", name]
        else:
            extra = PEERS[name][0]
            cmd = [str(PEER_PY), str(HERE / "run_peer.py"), name, "--threads", str(THREADS)]
            cmd += ["--out", str(SCORES), *extra]
        runs[name] = _run(cmd, name, timeout)
    return runs


def score_all(runs: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from etda.evaluate.lds import LDSConfig, ground_truth, lds
    from etda.settings import get_setting

    setting = get_setting("fmnist-mlp")
    gt = ground_truth(setting, LDSConfig(), cache_dir="runs/lds-cache")
    out = {}
    for name, r in runs.items():
        if "error" in r:
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
    for extra, _ in PEERS.values():
        if "--n-test" in extra:
            sizes.append(int(extra[extra.index("--n-test") + 1]))
    return sizes


# ----------------------------------------------------------------------------- report


def _fmt_lds(r: dict, n: int | None = None) -> str:
    if "error" in r:
        return "not available" if str(r["error"]).startswith("not available") else "failed"
    if n is not None and r.get("n_test") != n and f"lds_first{n}" in r:
        return f"{r[f'lds_first{n}']:.3f} ± {r[f'lds_first{n}_sem']:.3f}"
    return f"{r['lds']:.3f} ± {r['lds_sem']:.3f}"


def _lds_value(r: dict, n: int | None = None) -> float:
    if n is not None and r.get("n_test") != n and f"lds_first{n}" in r:
        return r[f"lds_first{n}"]
    return r["lds"]


def table(results: dict) -> str:
    lines = [
        "| peer configuration | peer LDS ± s.e. | peer wall s | peer peak RSS MB "
        "| etda configuration | etda LDS ± s.e. | etda wall s | etda peak RSS MB "
        "| LDS peer/etda | wall peer/etda | RSS peer/etda |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for peer, (_, partners) in PEERS.items():
        p = results.get(peer)
        if p is None:
            continue
        for partner in partners:
            e = results.get(partner)
            if e is None:
                continue
            n = p.get("n_test")
            note = f" (first {n} test)" if n and n < 500 else ""
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
    for name in ETDA:
        e = results.get(name)
        if e is not None:
            lines.append(
                f"| {name} | {ETDA[name][2]} | {_fmt_lds(e)} | {_num(e, 'wall_s')} "
                f"| {_num(e, 'peak_rss_mb', 0)} |"
            )
    return "\n".join(lines)


def _num(r: dict, key: str, digits: int = 1) -> str:
    return "–" if key not in r else f"{r[key]:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etda", choices=sorted(ETDA), help="(internal) run one etda config")
    parser.add_argument(
        "--only", nargs="*", choices=sorted([*PEERS, *ETDA]), help="configurations to run"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per config")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    if args.etda:
        run_etda(args.etda, SCORES)
        return
    if not PEER_PY.exists():
        raise SystemExit(f"{PEER_PY} missing: run `bash benchmarks/peers/setup.sh` first")
    if not args.no_export:
        subprocess.run([sys.executable, str(HERE / "export.py")], cwd=ROOT, check=True)
    names = args.only or [*PEERS, *ETDA]
    t0 = time.time()
    runs = run_all(names, args.reuse, args.timeout)
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
