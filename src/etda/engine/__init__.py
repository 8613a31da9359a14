"""The engine: ``attribute`` = options -> config -> plan -> member loop -> Scores.

``etda.attribute`` and ``etda.self_influence`` are the public entry points; ``resolve``
(``etda.engine.resolve``) makes a run's decisions and ``run`` (``etda.engine.loop``) executes
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from etda import batch
from etda.config import AttributeConfig
from etda.engine.loop import run
from etda.engine.resolve import RunPlan, resolve
from etda.ensemble.base import Ensemble
from etda.methods.base import Method, get_method
from etda.scores import Scores
from etda.sources import as_source

Models = nn.Module | Sequence[nn.Module]


def split_options(
    method: str | Method, options: dict[str, Any], config: AttributeConfig | None = None
) -> tuple[Method, AttributeConfig]:
    """The method (built with the options it takes) and the config (the rest of them)."""
    names = set(AttributeConfig.names())
    mine = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    if config is not None and mine:
        raise ValueError(f"pass options {sorted(mine)} in the config, not beside it")
    try:
        m = get_method(method, **rest)
    except ValueError as e:
        if "does not take option" in str(e):
            raise ValueError(f"{e}; attribute() options are {', '.join(sorted(names))}") from None
        raise
    return m, config if config is not None else AttributeConfig(**mine)


def attribute(
    models: Models,
    train: object,
    test: object,
    method: str | Method = "trak",
    ensemble: Ensemble | None = None,
    *,
    config: AttributeConfig | None = None,
    **options: Any,
) -> Scores:
    """Attribute the test predictions of ``models`` to the training examples.

    Returns :class:`etda.Scores` whose ``values`` have shape ``(n_test, n_train)``; positive
    means the training example helps the test prediction.

    ``models``: one trained module or a list (an independent ensemble, or the K models of a
    K x M hybrid when ``ensemble`` is given). ``train``/``test``: ``(x, y)`` or a Dataset.
    ``method``: a registered name (``graddot | gradcos | tracin | if | trak``) or an
    ``etda.Method``. ``ensemble``: ``None`` (one member per model), ``etda.Dropout(...)``,
    ``etda.LoRA(...)``, ... ``options``: the fields of :class:`etda.AttributeConfig`
    (``proj_dim``, ``projection``, ``seed``, ``memory_budget``, ``store``, ``scores_out``,
    ``top_k``, ``storage``, ``executor``, ``checkpoints``, ...; see its help) and the method's
    own (``damping``, ``solver``, ``form``). Or pass a ready ``config``.

    Scale: when the dense scores or features would not fit ``memory_budget`` (or
    ``out_of_core=True``, or ``scores_out`` is given) the run scores out of core: features on
    disk, scores in blocks of training columns, the ``top_k`` proponents/opponents per test
    example in ``Scores.topk`` (and ``Scores.top()``).
    """
    m, cfg = split_options(method, options, config)
    plan = resolve(cfg, models, train, test, m, ensemble)
    return run(plan)


def self_influence(
    models: Models,
    train: object,
    method: str | Method = "trak",
    ensemble: Ensemble | None = None,
    *,
    config: AttributeConfig | None = None,
    **options: Any,
) -> Scores:
    """Self-influence ``tau_i(z_i)`` of every training example as Scores of shape
    ``(1, n_train)`` (with costs and config): how much each example supports its own label.

    Uses the method's diagonal shortcut (no ``n x n`` matrix; per-example dropout masks are
    each example's training mask on both sides) where it has one, else the diagonal of the
    full attribution with test = train. Options as for :func:`attribute`.
    """
    m, cfg = split_options(method, options, config)
    x, y = as_source(train, "train")
    if not m.has_diagonal:
        full = run(resolve(cfg, models, (x, y), (x, y), m, ensemble))
        return Scores(
            np.diagonal(full.values).copy()[None, :], full.method, full.config, full.costs
        )
    # The diagonal needs training features only; the "test set" is one example for the probe.
    first = (batch.take(x, 0, 1), y[:1])
    return run(resolve(cfg, models, (x, y), first, m, ensemble, mode="self"))


__all__ = [
    "AttributeConfig",
    "RunPlan",
    "attribute",
    "resolve",
    "run",
    "self_influence",
    "split_options",
]
