"""The benchmark runner behind ``etda bench``: sweep, score, record, report.

For a named setting it builds (or loads) the LDS ground truth, then runs every
configuration of a sweep (``etda.bench.sweeps``) with models from the zoo, and records per
configuration the LDS mean ± s.e., every cost, the chosen damping and the member count. It
adds mislabel detection for a few configurations (with the loss and random baselines) and
the variance-theory fit on a K x M hybrid, then writes the report.

``<out>/results.json`` is rewritten (atomically) after every configuration: a run that is
killed loses at most the configuration in flight, and the next run skips every
configuration already recorded under the same setting fingerprint and LDS config (unless
``force``). Only summaries are stored, never score matrices.

Training costs: models come from the zoo's cache with the seconds of their original
training run, so the train cost of a configuration is what its models took to train
(naive K: K trainings; dropout: one; LoRA: one plus the adapters' fine-tuning; hybrid K x M:
K trainings plus adapters), whether or not this run trained them.
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from etda import __version__
from etda.bench.results import load_results, save_results
from etda.bench.sweeps import BenchConfig, MislabelConfig, Sweep, VarianceConfig, get_sweep
from etda.ensemble import ENSEMBLES
from etda.evaluate.lds import GroundTruth, LDSConfig, lds
from etda.experiment import build_ground_truth, damping_summary, run_attribution
from etda.settings import Setting, get_setting

FORMAT = 1
Log = Callable[[str], None]


def default_out(setting: str, quick: bool, regime: str = "default") -> Path:
    """``benchmarks/results/<setting>`` (``-quick`` appended for the quick sweep, ``-paper``
    for the paper regime)."""
    name = f"{setting}-quick" if quick else setting
    return Path("benchmarks/results") / (name if regime == "default" else f"{name}-{regime}")


# ----------------------------------------------------------------------- results file


def _fresh(setting: Setting, fingerprint: str, lds_config: LDSConfig, sweep: Sweep) -> dict:
    data = setting.data()
    return {
        "format": FORMAT,
        "setting": {
            "name": setting.name,
            "fingerprint": fingerprint,
            "description": setting.description,
            "n_train": data.n_train,
            "n_test": data.n_test,
            "model": setting.model_name,
            "recipe": setting.recipe.to_dict(),
        },
        "lds_config": lds_config.to_dict(),
        "sweep": sweep.name,
        "etda_version": __version__,
        "configs": {},
        "skipped": {},
        "failed": {},
        "mislabel": {},
        "variance": None,
    }


def _stamp(fingerprint: str, lds_config: LDSConfig) -> dict:
    return {"fingerprint": fingerprint, "lds_config": lds_config.to_dict()}


def _valid(rec: dict, stamp: dict) -> bool:
    return all(rec.get(k) == v for k, v in stamp.items())


# ------------------------------------------------------------------------- adapting


def adapt(setting: Setting, config: BenchConfig) -> tuple[BenchConfig | None, str]:
    """The configuration to run on ``setting`` (or None and why not): the ensemble adjusted
    to the setting's model where it has a sensible default (``Ensemble.for_model``), e.g. a
    dropout rate for a model trained without dropout."""
    try:
        ens, note = config.make_ensemble().for_model(setting.make_model(0), adapt=True)
    except ValueError as exc:
        return None, str(exc)
    p = getattr(ens, "p", None)
    if p != config.p:
        config = replace(config, p=p)
    return config, note


# ----------------------------------------------------------------------------- runner


def prefetch_checkpoints(
    setting: Setting, configs: tuple[BenchConfig, ...], model_dir: str | os.PathLike
) -> list[int]:
    """Train (or load) the models that checkpoint ensembles and TracIn need with every
    checkpoint the sweep asks for, once: the zoo retrains a cached model that lacks a
    requested checkpoint, which would otherwise change its recorded training seconds (and so
    the train cost of configurations that use it) in the middle of a sweep."""
    from etda.compat import needs_checkpoints
    from etda.experiment import checkpoint_schedule
    from etda.methods import get_method
    from etda.zoo import trained_models

    epochs: set[int] = set()
    count = 0
    for c in configs:
        ens = c.make_ensemble()
        if ens.members_are_checkpoints:
            epochs |= set(checkpoint_schedule(setting.recipe.epochs, c.m))
            count = max(count, c.models)
        elif needs_checkpoints(get_method(c.method), ens):
            epochs |= set(checkpoint_schedule(setting.recipe.epochs, 5))
            count = max(count, c.models)
    if count:
        trained_models(setting, count, model_dir, checkpoint_epochs=sorted(epochs), progress=False)
    return sorted(epochs)


def run_config(
    setting: Setting,
    config: BenchConfig,
    gt: GroundTruth,
    model_dir: str | os.PathLike,
    progress: bool = False,
) -> dict:
    """Run one configuration; its summary record (LDS, costs, damping, members)."""
    t0 = time.perf_counter()
    if config.train_fraction is not None:
        setting = setting.with_train_fraction(config.train_fraction)
    scores, _ = run_attribution(
        setting,
        config.method,
        config.ensemble,
        config.models,
        members=config.members,
        p=config.p,
        rank=config.rank,
        lora_epochs=config.lora_epochs,
        n_checkpoints=5,
        projection=config.projection,
        **config.options,  # proj_dim and damping, the regime's where the config names none
        seed=0,
        progress=progress,
        model_dir=model_dir,
    )
    result = lds(scores.values, gt)
    cfg = scores.config
    damp = [m["damping"] for m in cfg.get("members", []) if "damping" in m]
    models = cfg.get("models", [])
    return {
        **config.to_dict(),
        "lds": {"mean": result.mean, "sem": result.sem},
        "costs": scores.costs.to_dict(),
        "n_members": len(cfg.get("members", [])),
        "n_models_trained": len(models),
        "models_cached": int(sum(m["cached"] for m in models)),
        "model_train_s": float(sum(m["train_s"] for m in models)),
        "damping": {
            "summary": damping_summary(scores),
            "lam": [float(d["lam"]) for d in damp],
            "c": [d.get("c") for d in damp],
            "rule": sorted({d.get("rule", "?") for d in damp}),
        },
        "projection": cfg.get("projection"),
        "proj_dim": cfg.get("proj_dim"),
        "checkpoint_epochs": cfg.get("checkpoint_epochs", []),
        "attribute_wall_s": cfg.get("wall_s"),
        "wall_s": time.perf_counter() - t0,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _best_of(results: dict, method: str, preset: str) -> dict | None:
    """The one-model configuration of ``method`` with the best LDS among the presets of the
    same ensemble class as ``preset`` (``"best-dropout"``: every dropout preset)."""
    cls = ENSEMBLES.get_entry(preset).cls
    cands = [
        r
        for r in results["configs"].values()
        if r["method"] == method
        and r["ensemble"] in ENSEMBLES
        and ENSEMBLES[r["ensemble"]].cls is cls
        and r["models"] == 1
        and math.isfinite(r["lds"]["mean"])
    ]
    return max(cands, key=lambda r: r["lds"]["mean"]) if cands else None


def run_mislabel_config(
    setting: Setting, mc: MislabelConfig, results: dict, model_dir: Any
) -> tuple[dict | None, str]:
    from etda.evaluate.mislabel import run_mislabel

    ensemble, members, p = mc.ensemble, mc.members, mc.p
    if ensemble.startswith("best-"):
        family = ensemble.removeprefix("best-")
        best = _best_of(results, mc.method, family)
        if best is None:
            return None, f"no {family} configuration of {mc.method} in the results"
        ensemble, members, p = best["ensemble"], best["m"], best["p"]
    from etda.evaluate.mislabel import noisy_setting
    from etda.experiment import make_ensemble

    model = noisy_setting(setting, mc.fraction, mc.seed, mc.dropout).make_model(0)
    try:
        ens, _ = make_ensemble(ensemble, members, p=p).for_model(model, adapt=True)
    except ValueError as exc:
        return None, str(exc)
    p = getattr(ens, "p", p)
    epochs = setting.recipe.epochs * mc.epochs_factor if mc.epochs_factor else None
    rep = run_mislabel(
        setting,
        mc.method,
        ensemble,
        mc.fraction,
        mc.seed,
        k_models=mc.models,
        members=members,
        p=p,
        dropout=mc.dropout,
        epochs=epochs,
        model_dir=model_dir,
    )
    label = f"{mc.method} " + (
        f"naive {mc.models}" if ensemble == "none" else f"{ensemble} {members or ''}".strip()
    )
    if mc.ensemble.startswith("best-"):
        label += f" (best {mc.ensemble.removeprefix('best-')})"
    if mc.note:
        label += f" [{mc.note}: dropout {mc.dropout:g}, {rep['epochs']} epochs]"
    rep.update(key=mc.key, label=label, note=mc.note, p=p, members=members)
    return rep, ""


def run_variance(
    setting: Setting,
    vc: VarianceConfig,
    gt: GroundTruth,
    model_dir: Any,
    progress: bool = False,
) -> tuple[dict | None, str]:
    """Fit c_w / c_b on a K x M hybrid's member predictions of the ground-truth subsets."""
    from etda.evaluate.variance import fit_variance, measure, member_projections, theory_table
    from etda.experiment import make_ensemble
    from etda.zoo import trained_models

    kind, p = vc.ensemble, None
    try:
        ens, _ = make_ensemble(kind, vc.members).for_model(setting.make_model(0), adapt=True)
        p = getattr(ens, "p", None)
    except ValueError:
        kind = vc.fallback  # members cannot be made from this model: the sweep's second choice
    t0 = time.perf_counter()
    tms = trained_models(setting, vc.models, model_dir, progress=progress)
    ens = make_ensemble(kind, vc.members, p=p)
    data = setting.data()
    scores, u = member_projections(
        [tm.model for tm in tms],
        (data.x_train, data.y_train),
        (data.x_test, data.y_test),
        gt.masks,
        vc.method,
        ens,
        progress=progress,
    )
    target = gt.outputs.T  # (n_test, S)
    stats = fit_variance(u, target)
    sizes = [(k, m) for k in range(1, vc.models + 1) for m in range(1, vc.members + 1)]
    measured = measure(u, target, sizes)
    ks = sorted(set(vc.predict_models) | set(range(1, vc.models + 1)))
    ms = sorted(set(vc.predict_members) | set(range(1, vc.members + 1)))
    table = theory_table(stats, measured, ks, ms)
    combined = lds(scores.values, gt)
    table.update(
        key=vc.key,
        method=vc.method,
        ensemble=kind,
        p=p,
        models=vc.models,
        members=vc.members,
        combined_lds={"mean": combined.mean, "sem": combined.sem},
        note=(
            "members' own scores averaged (TRAK: each member's kernel x its own Q); "
            "combined_lds is TRAK's ensemble rule (kernel and Q averaged separately)"
        ),
        wall_s=time.perf_counter() - t0,
    )
    return table, ""


def run_bench(
    setting: str | Setting,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    methods: list[str] | None = None,
    *,
    sweep: Sweep | None = None,
    executor: str = "process",
    workers: int | None = None,
    address: str | None = None,
    force: bool = False,
    model_dir: str | os.PathLike | None = None,
    lds_cache: str | os.PathLike | None = None,
    lds_config: LDSConfig | None = None,
    mislabel: bool = True,
    variance: bool = True,
    report: bool = True,
    progress: bool = False,
    log: Log = print,
) -> dict:
    """Run (or resume) the benchmark sweep of ``setting``; returns the results dict.

    ``sweep``: a custom :class:`Sweep` (default: quick or full, restricted to ``methods``).
    Writes ``<out>/results.json`` after every step and, with ``report``, the Markdown
    report and PNG plots (``etda.report.write_report``).
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    sweep = (sweep or get_sweep(quick, setting=setting.name)).only(methods)
    lds_config = lds_config or LDSConfig(
        n_subsets=sweep.n_subsets, seeds_per_subset=sweep.seeds_per_subset
    )
    out = Path(out) if out is not None else default_out(setting.name, quick, sweep.name_regime)
    fingerprint = setting.fingerprint()
    stamp = _stamp(fingerprint, lds_config)
    results = _fresh(setting, fingerprint, lds_config, sweep)
    runs_s: list[float] = []  # wall seconds of every (resumed) run of this results file
    if (out / "results.json").exists():
        old = load_results(out)
        runs_s = list(old.get("bench_runs_wall_s", []))
        for section in ("configs", "mislabel"):
            for key, rec in old.get(section, {}).items():
                if _valid(rec, stamp):
                    results[section][key] = rec
        if old.get("variance") and _valid(old["variance"], stamp):
            results["variance"] = old["variance"]
        dropped = sum(len(old.get(s, {})) for s in ("configs", "mislabel")) - sum(
            len(results[s]) for s in ("configs", "mislabel")
        )
        if dropped:
            log(f"dropping {dropped} stale record(s) (other setting fingerprint or LDS config)")
    results["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    t_start = time.perf_counter()

    log(f"[{setting.name}] LDS ground truth: {lds_config}")
    gt_run = build_ground_truth(
        setting, lds_config, lds_cache, executor, workers, address, progress
    )
    gt = gt_run.gt
    results["ground_truth"] = {
        "jobs": gt_run.total,
        "cached": gt_run.cached,
        "trained_now": gt_run.trained,
        "retrain_seconds": gt.train_seconds,
        "wall_s": gt_run.wall_s,
        "cache": str(gt.path),
    }
    log(
        f"  {gt_run.total} jobs ({gt_run.cached} cached, {gt_run.trained} trained now) "
        f"in {gt_run.wall_s:.1f} s"
    )
    save_results(results, out)

    todo = tuple(c for c in sweep.configs if force or c.key not in results["configs"])
    prefetch_checkpoints(setting, todo, model_dir)
    for i, config in enumerate(sweep.configs, 1):
        key = config.key
        run, why = adapt(setting, config)
        head = f"[{i}/{len(sweep.configs)}] {config.method} {config.label}"
        if run is None:
            results["skipped"][key] = why
            log(f"{head}: skipped ({why})")
            continue
        if not force and key in results["configs"]:
            log(f"{head}: in results.json, skipped (--force to rerun)")
            continue
        try:
            rec = run_config(setting, run, gt, model_dir, progress)
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not stop the sweep
            results["failed"][key] = f"{type(exc).__name__}: {exc}"
            log(f"{head}: FAILED {type(exc).__name__}: {exc}")
            if progress:
                traceback.print_exc()
            save_results(results, out)
            continue
        rec.update(stamp, note=why)
        results["configs"][key] = rec
        results["failed"].pop(key, None)
        c = rec["costs"]
        log(
            f"{head}: LDS {rec['lds']['mean']:.4f} ± {rec['lds']['sem']:.4f} | train "
            f"{c['train_s']:.1f} s serve {c['serve_s']:.1f} s | {c['bytes'] / 2**20:.2f} MiB | "
            f"{rec['wall_s']:.1f} s"
        )
        save_results(results, out)

    if mislabel:
        for mc in sweep.mislabel:
            key = mc.key
            if not force and key in results["mislabel"]:
                log(f"mislabel {key}: in results.json, skipped")
                continue
            try:
                rep, why = run_mislabel_config(setting, mc, results, model_dir)
            except Exception as exc:  # noqa: BLE001
                results["failed"][f"mislabel:{key}"] = f"{type(exc).__name__}: {exc}"
                log(f"mislabel {key}: FAILED {type(exc).__name__}: {exc}")
                save_results(results, out)
                continue
            if rep is None:
                results["skipped"][f"mislabel:{key}"] = why
                log(f"mislabel {key}: skipped ({why})")
                continue
            rep.update(stamp)
            results["mislabel"][key] = rep
            results["failed"].pop(f"mislabel:{key}", None)
            log(
                f"mislabel {rep['label']}: AUC self-influence {rep['self_influence']['auc']:.3f}, "
                f"loss {rep['loss']['auc']:.3f}, random {rep['random']['auc']:.3f}; "
                f"memorized {rep['memorized']:.0%} of flips | {rep['wall_s']:.1f} s"
            )
            save_results(results, out)

    vc = sweep.variance
    if variance and vc is not None:
        if force or results["variance"] is None or results["variance"].get("key") != vc.key:
            try:
                table, _ = run_variance(setting, vc, gt, model_dir, progress)
                table.update(stamp)
                results["variance"] = table
                st = table["stats"]
                log(
                    f"variance {vc.key}: v {st['v']:.4g}, c_w {st['c_w']:.4g}, c_b "
                    f"{st['c_b']:.4g} | {table['wall_s']:.1f} s"
                )
            except Exception as exc:  # noqa: BLE001
                results["failed"][f"variance:{vc.key}"] = f"{type(exc).__name__}: {exc}"
                log(f"variance {vc.key}: FAILED {type(exc).__name__}: {exc}")
            save_results(results, out)
        else:
            log(f"variance {vc.key}: in results.json, skipped")

    results["bench_runs_wall_s"] = [*runs_s, time.perf_counter() - t_start]
    results["bench_wall_s"] = sum(results["bench_runs_wall_s"])  # over resumed runs
    save_results(results, out)
    if report:
        from etda.report import write_report

        files = write_report(out)
        log(f"report: {', '.join(str(f) for f in files)}")
    return results
