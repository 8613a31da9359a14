"""The run: one loop over ensemble members feeding a scorer, then the combined Scores.

Per member: expand it into weighted units (the method's ``expand``: TracIn's checkpoints,
else the member itself), featurize each unit through the featurization service, let the
method factor its scores, add them to the scorer; then close the member with its Q term
(from a forward-only model where the ensemble varies only Q). Members that share features
(``feature_key``) are featurized once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from etda import batch
from etda._version import __version__
from etda.cost import Costs, timer, weights_bytes
from etda.engine.resolve import RunPlan
from etda.ensemble.base import Member
from etda.features.distributed import featurize_parallel
from etda.features.service import FeatureRequest, load_checkpoint, member_tag
from etda.io import bar_off
from etda.methods.base import MemberContext
from etda.scores import Scores


def run(plan: RunPlan) -> Scores:
    """Execute ``plan``: the scores with their costs and the full record of the run."""
    t_start = time.perf_counter()
    costs = Costs(train_s=float(plan.config.train_seconds))
    costs.weights_bytes = sum(weights_bytes(m) for m in plan.models)
    scorer = plan.scorer()
    members: Any = plan.ensemble.members(plan.models, plan.build_context())
    if plan.parallel:
        members = list(members)  # built once: LoRA adapters train here
        _prefetch(plan, members, costs)
    shared: dict[str, list] = {}
    infos = []
    bar = tqdm(
        total=plan.ensemble.size(len(plan.models)),
        desc=f"{plan.method.name} members",
        unit="member",
        disable=bar_off(plan.config.progress),
    )
    for i, member in enumerate(members):
        costs.train_s += member.train_s
        if member.extra_weight_names:
            costs.weights_bytes += weights_bytes(member.model, member.extra_weight_names)
        costs.weights_bytes += member.extra_weights_bytes
        infos.append(_score_member(plan, i, member, scorer, costs, shared))
        bar.update(1)
    bar.close()
    expected = plan.ensemble.size(len(plan.models))
    if scorer.count != expected:
        raise RuntimeError(f"ensemble produced {scorer.count} members, expected {expected}")
    with timer(costs, "score_s"):
        combined = scorer.result()
    if plan.out_of_core and plan.mode == "attribute":
        widths = sum(u.width for u in scorer.units)  # type: ignore[union-attr]
        costs.flops += 2.0 * plan.test.n * plan.train.n * widths
    scores = Scores(combined.values, _method_name(plan), _record(plan, infos, combined), costs)
    scores.config["wall_s"] = time.perf_counter() - t_start
    if combined.top is not None:
        scores.topk = combined.top
    plan.cleanup()
    return scores


def _units(plan: RunPlan, i: int, member: Member) -> list[tuple[FeatureRequest, float]]:
    """The member's weighted units as feature requests (one per checkpoint for TracIn)."""
    tag = member_tag(i)
    out = []
    for c, (state, weight) in enumerate(plan.method.expand(plan.checkpoints_of(member))):
        if state is None:
            req = FeatureRequest(member.model, member.projection_seed, tag, member.params)
        else:
            model = load_checkpoint(member.model, state)
            req = FeatureRequest(model, member.projection_seed, f"{tag}-ckpt{c:02d}", member.params)
        out.append((req, weight))
    return out


def _prefetch(plan: RunPlan, members: list[Member], costs: Costs) -> None:
    """Featurize every member's units on the executor first (members sharing features once)."""
    seen: set[str] = set()
    requests = []
    for i, member in enumerate(members):
        if member.feature_key is not None:
            if member.feature_key in seen:
                continue
            seen.add(member.feature_key)
        requests += [req for req, _ in _units(plan, i, member)]
    c = plan.config
    featurize_parallel(
        plan.service, requests, costs, c.executor, c.workers, c.address, _splits(plan)
    )


def _splits(plan: RunPlan) -> tuple[str, ...]:
    return ("train",) if plan.mode == "self" else ("train", "test")


def _score_member(
    plan: RunPlan, i: int, member: Member, scorer: Any, costs: Costs, shared: dict[str, list]
) -> dict:
    """Featurize and factor the member's units (or reuse a shared member's), add them to the
    scorer and close the member. Returns its record for ``Scores.config["members"]``."""
    key = member.feature_key
    parts = shared.get(key) if key is not None else None
    if parts is None:
        parts = [_factor_unit(plan, req, weight, costs) for req, weight in _units(plan, i, member)]
        if key is not None:
            shared[key] = parts
    q = None
    if member.q_model is not None:
        with timer(costs, "score_s"):
            q = plan.service.q_term(member.q_model)
        costs.flops += plan.service.fwd_flops * plan.train.n
    with timer(costs, "score_s"):
        for factors, train, weight in parts:
            if plan.mode == "self":
                scorer.add_values(factors.values[None, :], weight)
            else:
                scorer.add(factors, train, weight)
        scorer.end_member(q if q is not None else parts[0][0].q)
    info = parts[0][0].info if len(parts) == 1 else {"checkpoints": len(parts)}
    return {
        "label": member.label,
        "projection_seed": member.projection_seed,
        **member.info,
        **info,
    }


def _factor_unit(plan: RunPlan, req: FeatureRequest, weight: float, costs: Costs) -> tuple:
    """One unit's factors (or diagonal, for self-influence), its training view, its weight."""
    stream = plan.stream_rows if plan.out_of_core else None
    train, test, fz = plan.service.featurize(req, costs, stream, _splits(plan))
    dtype = plan.torch_dtype
    ctx = MemberContext(
        req.model,
        plan.task,
        fz.params,
        _in_memory(plan.train.x, plan.train.y, dtype),
        fz,
        _in_memory(plan.test.x, plan.test.y, dtype),
    )
    with timer(costs, "score_s"):
        if plan.mode == "self":
            factors = plan.method.diagonal(train, ctx)
        else:
            factors = plan.method.factors(train, test, ctx)
    return factors, train, weight


def _in_memory(x: batch.Inputs, y: Tensor, dtype: torch.dtype) -> Callable[[], tuple]:
    """A split for a method that needs it whole (exact-Hessian IF), read only if asked."""
    return lambda: (batch.cast(batch.materialize(x), dtype), y)


def _method_name(plan: RunPlan) -> str:
    return f"self-{plan.method.name}" if plan.mode == "self" else plan.method.name


def _record(plan: RunPlan, infos: list[dict], combined: Any) -> dict:
    """``Scores.config``: what was asked (``options``) and what was decided."""
    c = plan.config
    return {
        "method": _method_name(plan),
        "method_options": plan.method.options(),
        "ensemble": plan.ensemble.to_dict(),
        "n_models": len(plan.models),
        "members": infos,
        "projection": plan.projection,
        "proj_dim": plan.proj_dim,
        "seed": c.seed,
        "dtype": c.dtype,
        "chunk_size": plan.chunk_size,
        "n_train": plan.train.n,
        "n_test": plan.test.n if plan.mode == "attribute" else plan.train.n,
        "task": plan.task.name,
        "etda_version": __version__,
        "storage": c.storage,
        "out_of_core": plan.out_of_core,
        "score_block": combined.block,
        "memory_budget": c.memory_budget,
        "executor": c.executor,
        "options": c.to_dict(),
        **({"shared_solve": combined.info} if combined.info is not None else {}),
    }
