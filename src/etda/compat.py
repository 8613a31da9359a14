"""Which method goes with which ensemble and which options: every such rule, in one place.

Methods and ensembles declare capabilities (``Method.needs``, ``combine.uses_q``,
``streamable``; ``Ensemble.provides``, ``varies_features``, ``members_are_checkpoints``);
this module turns them into decisions and clear errors. Nothing else in etda asks whether a
method or ensemble is a particular one: the engine, the CLI, the experiments, mislabel
detection, explain, the benchmarks and the variance code call these functions.
"""

from __future__ import annotations

from typing import Any

from etda.ensemble.base import ENSEMBLES, Ensemble
from etda.methods.base import METHODS, Method


def needs_checkpoints(method: Method, ensemble: Ensemble) -> bool:
    """Whether the run must be given checkpoints (the method needs them and the ensemble's
    members do not bring their own)."""
    return "checkpoints" in method.needs and "checkpoints" not in ensemble.provides


def check(method: Method, ensemble: Ensemble, checkpoints: Any = None) -> None:
    """Refuse a method x ensemble combination that cannot mean what it says."""
    if not ensemble.varies_features and not method.combine.uses_q:
        raise ValueError(
            f"ensemble {ensemble.kind!r} (Dropout(forward_only=True)) changes only TRAK's Q term; "
            f"method {method.name!r} has none, so it would return single-model scores. Use "
            "forward_only=False (ensemble 'dropout') instead."
        )
    if "checkpoints" in method.needs and ensemble.members_are_checkpoints:
        raise ValueError(
            f"{method.title} already sums over the checkpoints of each run; use it with another "
            "ensemble (e.g. 'none'), or use the checkpoints ensemble with another method"
        )
    if needs_checkpoints(method, ensemble) and checkpoints is None:
        raise ValueError(f"method {method.name!r} needs checkpoints=[...] (and checkpoint_lrs)")


def check_out_of_core(method: Method, projection: str, explicit_rows: bool = False) -> None:
    """Refuse out-of-core scoring where it has no meaning (``explicit_rows``: the features
    are explicit rows even without a projection, e.g. curvature-preconditioned gradients)."""
    if projection == "none" and not explicit_rows:
        raise ValueError(
            "out-of-core scoring needs projected features: the exact kernel is n x n; pass "
            "proj_dim=... (CLI --proj-dim) or projection='factored'"
        )
    if not method.streamable:
        raise ValueError(
            f"method {method.name!r} with options {method.options()} has no out-of-core form "
            "(damping='gcv'/'evidence' and solver='cg' need everything in memory); raise "
            "memory_budget or choose other options"
        )


def compatible(method: str, kind: str) -> bool:
    """Whether registered method ``method`` runs with ensemble preset ``kind`` at its defaults
    (checkpoints supplied where the method needs them); for generated sweeps and tests."""
    m = METHODS.get_entry(method)()
    e = ENSEMBLES.get_entry(kind).build()
    try:
        check(m, e, checkpoints=[])
    except ValueError:
        return False
    return True
