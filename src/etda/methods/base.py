"""The method template: member features -> member scores -> combined scores.

A method declares which per-example scalar it differentiates (``target``), turns one
member's train/test features into a score matrix ``(n_test, n_train)`` and says how
member results combine (``combine``). Methods only see features through inner
products (``etda.features.blocks``), so every featurizer and every ensemble works with
every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from etda.features import blocks as fb

if TYPE_CHECKING:
    from etda.features.store import SplitStore
    from etda.outofcore import MemberFactors


@dataclass
class MemberContext:
    """What a method may need beyond features (model access for exact-Hessian IF)."""

    model: Any = None
    task: Any = None
    params: list[str] = field(default_factory=list)
    train_xy: tuple[Tensor, Tensor] | None = None
    featurizer: Any = None
    test_xy: tuple[Tensor, Tensor] | None = None


@dataclass
class MemberResult:
    values: Tensor  # (n_test, n_train) float64
    q: Tensor | None = None  # (n_train,) TRAK's Q term
    info: dict = field(default_factory=dict)


def features_only(blocks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in blocks.items() if k not in fb.EXTRA}


class Method(ABC):
    """Base class: subclasses set ``name``, ``target`` and implement ``member``."""

    name: ClassVar[str]
    target: ClassVar[str] = "loss"  # "loss" | "output"
    combine: ClassVar[str] = "mean"  # "mean" | "trak" (kernel and Q averaged separately)
    uses_checkpoints: ClassVar[bool] = False

    def options(self) -> dict:
        return {}

    def factors(
        self, train: SplitStore, test: Mapping[str, Tensor], ctx: MemberContext, block: int
    ) -> MemberFactors:
        """Out-of-core form of ``member``: ``tau = left @ Phi_train^T * col_scale`` from
        stored training features streamed ``block`` rows at a time (etda.outofcore)."""
        raise ValueError(
            f"method {self.name!r} has no out-of-core form; use graddot, gradcos, if "
            "(solver='eigen') or trak, or a memory budget that fits the dense scores"
        )

    @abstractmethod
    def member(
        self, train: Mapping[str, Tensor], test: Mapping[str, Tensor], ctx: MemberContext
    ) -> MemberResult:
        """Scores of one member ``(n_test, n_train)`` from its feature blocks."""


class Combiner:
    """Accumulates member results one at a time (memory does not grow with members)."""

    def __init__(self, rule: str) -> None:
        self.rule, self.count = rule, 0
        self.total: Tensor | None = None
        self.q: Tensor | None = None
        self.infos: list[dict] = []

    def add(self, r: MemberResult, weight: float = 1.0) -> None:
        self.total = (
            r.values * weight if self.total is None else self.total.add_(r.values, alpha=weight)
        )
        if self.rule == "trak":
            if r.q is None:
                raise ValueError("TRAK combination needs a Q term from every member")
            self.q = r.q.clone() if self.q is None else self.q.add_(r.q)
        self.count += 1
        self.infos.append(r.info)

    def result(self) -> Tensor:
        """Combined scores ``(n_test, n_train)``."""
        if self.total is None:
            raise ValueError("no members were scored")
        values = self.total / self.count
        if self.rule == "trak":
            values = values * (self.q / self.count)[None, :]
        return values


def as_float64(t: Tensor) -> Tensor:
    return t.to(torch.float64)
