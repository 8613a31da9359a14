"""Experiments on named settings: the logic behind ``etda attribute`` and the benchmarks.

``make_ensemble`` turns command-line style options into an ensemble object;
``run_attribution`` trains (or loads cached) models of a setting, attributes with any
method x ensemble, and optionally scores the result with LDS against a cached ground truth.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from etda.compat import check, needs_checkpoints
from etda.engine import attribute
from etda.ensemble import ENSEMBLES, Ensemble
from etda.ensemble import make_ensemble as make_preset
from etda.features.featurize import PROJECTIONS as _PROJECTIONS
from etda.methods import METHODS, Method, get_method, method_takes
from etda.methods.solve import edof_fraction
from etda.paths import cache_path
from etda.scores import Scores
from etda.settings import Setting, get_setting
from etda.zoo import TrainedModel, trained_models

if TYPE_CHECKING:  # etda.evaluate is imported lazily: LDS is optional for a run
    from etda.evaluate.lds import GroundTruth, LDSConfig, LDSResult

PROJECTIONS = ("auto", *_PROJECTIONS)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def default_members(kind: str) -> int:
    """Members per trained model of preset ``kind`` when none are asked for."""
    return ENSEMBLES.get_entry(kind).default_members


def make_ensemble(
    kind: str,
    members: int | None = None,
    *,
    p: float | None = None,
    rank: int | None = None,
    lora_epochs: int | None = None,
    lora_gradients: str | None = None,
    seed: int | None = None,
) -> Ensemble:
    """The ensemble of preset ``kind`` (a key of ``etda.ENSEMBLES``) from command-line style
    options (``None``: the preset's default). ``members``: members per trained model; for
    ``"checkpoints"`` the number of checkpoints per run, which ``run_attribution`` uses to
    choose the checkpoint epochs. ``p``: dropout-rate override; ``rank``/``lora_epochs``/
    ``lora_gradients`` (``"adapters"`` or ``"all"``): LoRA.
    """
    if members is not None:
        _positive_int(members, "members")
    return make_preset(
        kind,
        members=members,
        p=p,
        rank=rank,
        epochs=lora_epochs,
        gradients=lora_gradients,
        seed=seed,
    )


def ensemble_kind(ensemble: Ensemble | None) -> str:
    """The preset name describing an ensemble object (``None``: ``"none"``)."""
    return "none" if ensemble is None else ensemble.kind


def checkpoint_schedule(epochs: int, n: int) -> list[int]:
    """``n`` checkpoint epochs evenly spaced over ``1..epochs``, ending at the last epoch."""
    _positive_int(n, "number of checkpoints")
    if n > epochs:
        raise ValueError(f"cannot take {n} checkpoints from a run of {epochs} epochs")
    return sorted({int(math.floor(epochs * (i + 1) / n + 0.5)) for i in range(n)})


def parse_damping(value: str | float | None) -> float | str | None:
    """``"auto"``, ``"gcv"``, ``"evidence"``, ``"trace:C"``, ``"edof:F"`` or a number >= 0 (a
    string from the command line)."""
    if value is None or isinstance(value, int | float) and not isinstance(value, bool):
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise ValueError(f"damping must be a finite number >= 0, got {value}")
        return value
    text = str(value).strip()
    if text in ("auto", "gcv", "evidence"):
        return text
    if text.startswith("edof:"):
        edof_fraction(text)  # 0 < F <= 1, or a ValueError naming it
        return text
    if text.startswith("trace:"):
        try:
            c = float(text.split(":", 1)[1])
        except ValueError:
            c = -1.0
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"damping {text!r}: trace:C needs a number C >= 0, e.g. trace:0.1")
        return text
    try:
        lam = float(text)
    except ValueError:
        raise ValueError(
            f"damping must be 'auto', 'gcv', 'evidence', 'trace:C', 'edof:F' or a number >= 0, "
            f"got {text!r}"
        ) from None
    return parse_damping(lam)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads once for a run (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(_positive_int(threads, "threads"))


# ------------------------------------------------------------------------------ LDS


@dataclass
class GroundTruthRun:
    """A ground truth and how it was obtained: jobs found in the cache vs trained now."""

    gt: GroundTruth
    cached: int
    total: int
    wall_s: float

    @property
    def trained(self) -> int:
        return self.total - self.cached


def cached_jobs(setting: Setting, config: LDSConfig, cache_dir: str | os.PathLike) -> int:
    """How many of the ground-truth jobs of ``config`` already have a file in the cache."""
    from etda.evaluate.lds import cache_folder

    folder = cache_folder(setting, config, cache_dir)
    if not folder.is_dir():
        return 0
    names = {p.name for p in folder.glob("job-*.npz")}
    return sum(
        f"job-s{s:04d}-r{r:02d}.npz" in names
        for s in range(config.n_subsets)
        for r in range(config.seeds_per_subset)
    )


def build_ground_truth(
    setting: Setting | str,
    config: LDSConfig,
    cache_dir: str | os.PathLike | None = None,
    executor: str = "process",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> GroundTruthRun:
    """Build or resume the LDS ground truth of ``setting`` (retraining only missing jobs)."""
    from etda.evaluate.lds import ground_truth

    setting = get_setting(setting) if isinstance(setting, str) else setting
    cached = cached_jobs(setting, config, cache_dir)
    t0 = time.perf_counter()
    gt = ground_truth(setting, config, cache_dir, executor, workers, address, progress)
    total = config.n_subsets * config.seeds_per_subset
    return GroundTruthRun(gt, min(cached, total), total, time.perf_counter() - t0)


# -------------------------------------------------------------------------- attribute


def checkpoint_models(setting: Setting, tms: list[TrainedModel]) -> list[nn.Module]:
    out = []
    for tm in tms:
        for state in tm.checkpoints:
            m = setting.make_model(tm.seed)
            m.load_state_dict(state, strict=True)
            out.append(m.eval())
    return out


def _state_bytes(states: list[dict[str, torch.Tensor]]) -> int:
    return int(sum(t.numel() * t.element_size() for s in states for t in s.values()))


def prepare_models(
    setting: Setting,
    method: str | Method,
    kind: str | Ensemble,
    k_models: int,
    n_checkpoints: int,
    model_dir: str | os.PathLike | None = None,
    first_seed: int = 0,
    progress: bool = True,
) -> tuple[list[TrainedModel], list[nn.Module], dict[str, Any]]:
    """Trained (cached) models an attribution needs, the modules to attribute and the
    ``checkpoints``/``checkpoint_lrs`` arguments of a method that needs checkpoints (empty
    unless the method needs them and the ensemble's members bring none)."""
    m = get_method(method) if isinstance(method, str) else method
    ens = make_preset(kind) if isinstance(kind, str) else kind
    give_checkpoints = needs_checkpoints(m, ens)
    take = give_checkpoints or ens.members_are_checkpoints
    epochs = checkpoint_schedule(setting.recipe.epochs, n_checkpoints) if take else []
    start = ens.run_start(setting.recipe.epochs)  # members continue the run from there
    if start is not None:
        epochs = [start]
    tms = trained_models(
        setting, k_models, model_dir, first_seed, checkpoint_epochs=epochs, progress=progress
    )
    if ens.members_are_checkpoints or start is not None:
        models = checkpoint_models(setting, tms)
    else:
        models = [tm.model for tm in tms]
    checkpoint_kw: dict[str, Any] = {}
    if give_checkpoints:
        checkpoint_kw = {
            "checkpoints": [tm.checkpoints for tm in tms],
            "checkpoint_lrs": tms[0].checkpoint_lrs,
        }
    return tms, models, checkpoint_kw


def run_attribution(
    setting: Setting | str,
    method: str = "trak",
    ensemble: str | Ensemble | None = "none",
    k_models: int = 1,
    *,
    members: int | None = None,
    p: float | None = None,
    rank: int | None = None,
    lora_epochs: int | None = None,
    lora_gradients: str | None = None,
    n_checkpoints: int = 5,
    proj_dim: int | None = None,
    projection: str = "auto",
    damping: float | str | None = None,
    seed: int = 0,
    store: str | os.PathLike | None = None,
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
    first_seed: int = 0,
    lds_config: LDSConfig | None = None,
    lds_cache_dir: str | os.PathLike | None = None,
    executor: str = "process",
    workers: int | None = None,
    address: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    attribute_options: Mapping[str, Any] | None = None,
) -> tuple[Scores, LDSResult | None]:
    """Attribute a setting's test set to its training set; optionally measure the LDS.

    Trains (or loads from ``model_dir``) ``k_models`` models of ``setting`` from seeds
    ``first_seed, ...``, builds ``ensemble`` (a kind from ``ENSEMBLES`` with ``members``
    etc., or an Ensemble object), and runs :func:`etda.attribute` with the models' original
    training seconds as ``train_seconds``. Checkpoint ensembles use ``members`` (kind
    string) or ``n_checkpoints`` (object) checkpoints per run, evenly spaced; TracIn uses
    ``n_checkpoints``. ``attribute_options``: further keywords for :func:`etda.attribute`
    (``memory_budget``, ``storage``, ``scores_out``, ``top_k``, and ``executor``/``workers``/
    ``address`` for featurization). ``lds_config``: if given, the LDS against the cached
    ground truth (built or resumed with ``executor``) is returned and recorded in
    ``scores.config["lds"]``.

    Returns ``(scores, lds_result or None)``; ``scores.config`` also records the setting,
    the models (seeds, cache paths, seconds, cached or trained now) and checkpoint epochs.
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    k_models = _positive_int(k_models, "k_models (the number of trained models)")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose from {', '.join(PROJECTIONS)}")
    if proj_dim is not None:
        _positive_int(proj_dim, "proj_dim")
    options = dict(method_options or {})
    damping = parse_damping(damping)
    if damping is not None:
        if not method_takes(method, "damping"):
            raise ValueError(f"method {method!r} has no damping; drop the damping option")
        options["damping"] = damping

    if isinstance(ensemble, str) or ensemble is None:
        ens = make_ensemble(
            ensemble or "none",
            members,
            p=p,
            rank=rank,
            lora_epochs=lora_epochs,
            lora_gradients=lora_gradients,
        )
    else:
        ens = ensemble
    kind = ens.kind
    # checkpoints per run: the checkpoint ensemble's size, else what the method reads
    n_ckpt = getattr(ens, "n_members", n_checkpoints) if ens.members_are_checkpoints else None
    n_ckpt = n_ckpt or n_checkpoints
    method_obj = get_method(method, **options)
    check(method_obj, ens, checkpoints=[])  # fail before training, not after
    ens.for_model(setting.make_model(first_seed))
    tms, models, checkpoint_kw = prepare_models(
        setting, method_obj, ens, k_models, n_ckpt, model_dir, first_seed, progress
    )
    train_seconds = sum(tm.seconds for tm in tms)
    start = ens.run_start(setting.recipe.epochs)
    if start is not None:  # members continue the run from epoch `start`: only that part counts
        train_seconds *= start / setting.recipe.epochs
        ens = ens.fit_run(setting.recipe)
    data = setting.data()
    scores = attribute(
        models,
        train=(data.x_train, data.y_train),
        test=(data.x_test, data.y_test),
        method=method_obj,
        ensemble=ens,
        proj_dim=proj_dim,
        projection=projection,
        seed=seed,
        store=store,
        progress=progress,
        train_seconds=train_seconds,
        **checkpoint_kw,
        **dict(attribute_options or {}),
    )
    if checkpoint_kw:
        # A method that reads checkpoints keeps them: they are part of the space it needs.
        extra = sum(_state_bytes(tm.checkpoints) for tm in tms)
        scores.costs.weights_bytes += extra
        scores.config["tracin_checkpoint_bytes"] = extra
    scores.config.update(
        setting={"name": setting.name, "fingerprint": setting.fingerprint()[:12]},
        ensemble_kind=kind,
        models=[
            {"seed": tm.seed, "path": str(tm.path), "train_s": tm.seconds, "cached": tm.cached}
            for tm in tms
        ],
        checkpoint_epochs=tms[0].checkpoint_epochs,
    )
    result = None
    if lds_config is not None:
        from etda.evaluate.lds import lds

        run = build_ground_truth(
            setting, lds_config, lds_cache_dir, executor, workers, address, progress
        )
        result = lds(scores.values, run.gt)
        scores.config["lds"] = {
            "mean": result.mean,
            "sem": result.sem,
            "config": lds_config.to_dict(),
            "jobs_cached": run.cached,
            "jobs_trained": run.trained,
            "ground_truth_train_s": run.gt.train_seconds,
            "cache": str(run.gt.path) if run.gt.path is not None else None,
        }
    return scores, result


def default_out_dir(
    setting: str, method: str, ensemble: str, k_models: int, members: int | None, seed: int
) -> Path:
    """``<cache>/attribute/<setting>-<method>-<ensemble>-k<K>-m<M>-s<seed>`` (the cache:
    :func:`etda.paths.cache_root`)."""
    m = (default_members(ensemble) if ensemble in ENSEMBLES else 1) if members is None else members
    return cache_path("attribute") / f"{setting}-{method}-{ensemble}-k{k_models}-m{m}-s{seed}"


def damping_summary(scores: Scores) -> str:
    """The damping each member chose, condensed (``""`` if the method has none)."""
    chosen = [m["damping"] for m in scores.config.get("members", []) if "damping" in m]
    shared = scores.config.get("shared_solve")
    if shared is not None and "damping" in shared:
        chosen = [shared["damping"]]  # one solve for the ensemble's mean kernel
    if not chosen:
        return ""
    rules = sorted({d.get("rule", "?") for d in chosen})
    lams = [float(d["lam"]) for d in chosen]
    cs = [float(d["c"]) for d in chosen if d.get("c") is not None]

    def span(v: list[float]) -> str:
        lo, hi = min(v), max(v)
        return f"{lo:.3g}" if math.isclose(lo, hi, rel_tol=1e-9) else f"{lo:.3g}..{hi:.3g}"

    text = f"{'/'.join(rules)}: λ = {span(lams)}"
    if cs:
        text += f" (c = {span(cs)} × tr(K)/min(n, k))"
    if shared is not None:
        return text + " (one shared solve)"
    return text + (f" over {len(chosen)} members" if len(chosen) > 1 else "")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (eval mode, no gradients)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch_size):
            pred = model(x[lo : lo + batch_size]).argmax(-1)
            correct += int((pred == y[lo : lo + batch_size]).sum())
    model.train(was)
    return correct / max(1, y.numel())  # per token for sequence targets
