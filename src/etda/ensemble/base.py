"""Ensembles: how members are made. A member is a ready-to-featurize model plus its seeds.

Members are produced lazily, one at a time, so memory does not grow with the member
count. Every member is reproducible from the ensemble's seed and its position.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from etda.seeding import derive_seed
from etda.task import ParamSelector, Task


@dataclass
class Member:
    """One ensemble member.

    ``model``: the module to featurize (a copy; masks or adapters installed);
    ``projection_seed``: seed of its random projection;
    ``feature_key``: members with equal keys share one featurization (forward-only
    dropout) and differ only in ``q_model``, the model whose forward pass gives Q;
    ``checkpoints``: ``[(state_dict, lr)]`` for TracIn (None: use the given ones);
    ``train_s``: seconds spent making this member (e.g. fine-tuning an adapter).
    """

    model: nn.Module
    projection_seed: int
    label: str
    params: ParamSelector = "all"
    feature_key: str | None = None
    q_model: nn.Module | None = None
    checkpoints: list[tuple[dict[str, Tensor], float]] | None = None
    train_s: float = 0.0
    extra_weight_names: list[str] | None = None  # parameters this member adds (adapters)
    model_index: int = 0  # which given model the member derives from
    info: dict = field(default_factory=dict)


@dataclass
class BuildContext:
    """What member construction may need: the training data, task and dtype."""

    x_train: Tensor
    y_train: Tensor
    task: Task
    seed: int
    dtype: torch.dtype = torch.float32
    progress: bool = True


class Ensemble(ABC):
    """Base class: ``members(models, ctx)`` yields members, one at a time."""

    name: str = "ensemble"

    @abstractmethod
    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]: ...

    @abstractmethod
    def size(self, n_models: int) -> int:
        """Number of members for ``n_models`` given models."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def member_seed(seed: int, model_index: int, member_index: int) -> int:
    return derive_seed(seed, model_index, member_index) % (2**31)


def prepared_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` in ``dtype`` (the user's model is never modified)."""
    m = copy.deepcopy(model).to(dtype)
    m.eval()
    return m


class Independent(Ensemble):
    """One member per given model (the naive independent ensemble); ``ensemble=None``."""

    name = "independent"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def size(self, n_models: int) -> int:
        return n_models

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, m in enumerate(models):
            yield Member(
                prepared_copy(m, ctx.dtype), member_seed(seed, k, 0), f"model{k}", model_index=k
            )


class Checkpoints(Independent):
    """Members = checkpoints of one training run (pass the checkpoint models as ``models``)."""

    name = "checkpoints"

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        names = [tuple((n, p.shape) for n, p in m.named_parameters()) for m in models]
        for k, nm in enumerate(names[1:], 1):
            if nm != names[0]:
                raise ValueError(
                    f"checkpoint {k} does not match checkpoint 0 (different parameter names or "
                    "shapes): checkpoints must come from one training run"
                )
        for member in super().members(models, ctx):
            member.label = member.label.replace("model", "checkpoint")
            yield member


class ProjectionSeeds(Ensemble):
    """The same model with ``members`` different projection seeds (a baseline)."""

    name = "projection-seeds"

    def __init__(self, members: int = 10, seed: int | None = None) -> None:
        _check_members(members)
        self.n_members, self.seed = members, seed

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, m in enumerate(models):
            base = prepared_copy(m, ctx.dtype)
            for j in range(self.n_members):
                yield Member(base, member_seed(seed, k, j), f"model{k}-proj{j}", model_index=k)


def _check_members(members: int) -> None:
    if not isinstance(members, int) or members <= 0:
        raise ValueError(f"members must be a positive integer, got {members!r}")
