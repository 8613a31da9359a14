"""The method template: one member's features -> its scores in factored form -> combined.

A method declares what it differentiates (``target``), how members combine (``combine``, a
rule object), what it needs beyond features (``needs``), and writes its linear algebra once,
as a :class:`MemberFactors`::

    tau = left @ Phi_train^T * col_scale      (feature space: left (n_test, k))
    tau = left * col_scale                    (sample space:  left (n_test, n_train))

Both scorers use that one form: the dense scorer multiplies it out for all training columns at
once, the blocked (out-of-core) scorer one block of columns at a time. Methods see features only
through the views of :mod:`etda.features.blocks` (inner products, Gram matrices, row blocks), so
every featurizer and every ensemble works with every method.

A method class registers itself under its ``name`` (``etda.methods.METHODS``), which is how the
CLI, the sweeps and the tests find it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from etda.features.blocks import Features, TrainFeatures
from etda.features.curvature import CurvatureSpec
from etda.registry import Registry

Space = Literal["feature", "sample", "kernel"]
Checkpoint = tuple[dict[str, Tensor], float]  # (state dict, learning-rate weight)


@dataclass
class MemberContext:
    """What a method may need beyond features (the model and data, for exact-Hessian IF)."""

    model: Any = None
    task: Any = None
    params: list[str] = field(default_factory=list)
    train_xy: Callable[[], tuple[Any, Tensor]] | None = None  # reads the split whole
    featurizer: Any = None
    test_xy: Callable[[], tuple[Any, Tensor]] | None = None

    @property
    def curvature_info(self) -> dict | None:
        """The fitted curvature's record (kind, Fisher, damping per layer), if any."""
        pre = getattr(self.featurizer, "curvature", None)
        return None if pre is None else pre.info()


@dataclass
class MemberFactors:
    """One member's scores, factored (see the module doc). ``q``: TRAK's Q term ``(n_train,)``."""

    left: Tensor | None
    space: Space = "feature"
    col_scale: Tensor | None = None
    q: Tensor | None = None
    info: dict = field(default_factory=dict)
    left_file: Path | None = None  # out of core: ``left`` spilled to this .npy file
    width: int = 0  # columns of ``left``
    kernel: Tensor | None = None  # space "kernel": the member's train kernel (n, n); left is
    # then its test-train kernel (n_test, n), both combined before one shared solve

    def __post_init__(self) -> None:
        if self.left is not None:
            self.width = int(self.left.shape[1])


@dataclass
class Diagonal:
    """One member's self-influence ``tau_i(z_i)`` ``(n_train,)`` (and Q, for TRAK's rule)."""

    values: Tensor
    q: Tensor | None = None
    info: dict = field(default_factory=dict)


def block_scores(
    left: Tensor,
    space: Space,
    col_scale: Tensor | None,
    train: TrainFeatures,
    lo: int,
    hi: int,
) -> Tensor:
    """Columns ``[lo, hi)`` of a member's scores ``(n_test, hi - lo)`` from its form."""
    # "sample": scores already; "feature": a left factor times the training rows, in the
    # features' kernel precision (float64 unless a mixed-precision kernel was asked for)
    if space == "sample":
        part = left[:, lo:hi]
    else:
        prec = train.precision
        part = (left.to(prec) @ train.rows(lo, hi, prec).T).to(torch.float64)
    if col_scale is not None:
        part = part * col_scale[lo:hi][None, :]
    return part


class CombineRule(ABC):
    """How member scores combine into the ensemble's scores."""

    name: ClassVar[str]
    uses_q: ClassVar[bool] = False

    @abstractmethod
    def finish(self, total: Tensor, count: int, q_total: Tensor | None, lo: int = 0) -> Tensor:
        """Combined scores from the sum of ``count`` member scores (columns from ``lo``)."""


class Mean(CombineRule):
    """The mean of the members' scores."""

    name = "mean"

    def finish(self, total: Tensor, count: int, q_total: Tensor | None, lo: int = 0) -> Tensor:
        return total / count


class KernelTimesMeanQ(CombineRule):
    """TRAK (Park et al., 2023): the kernel term and Q are averaged over members separately
    and multiplied at the end."""

    name = "trak"
    uses_q = True

    def finish(self, total: Tensor, count: int, q_total: Tensor | None, lo: int = 0) -> Tensor:
        if q_total is None:
            raise ValueError("TRAK combination needs a Q term from every member")
        q = (q_total / count)[lo : lo + total.shape[1]]
        return total / count * q[None, :]


METHODS: Registry[type[Method]] = Registry("method")


class Method(ABC):
    """Base class: subclasses set ``name`` (and ``title``, ``description``, ``target``,
    ``combine``, ``needs`` where they differ) and implement :meth:`factors`."""

    name: ClassVar[str]
    title: ClassVar[str] = ""  # how reports print it, e.g. "TRAK"
    description: ClassVar[str] = ""
    target: ClassVar[str] = "loss"  # "loss" | "output": the per-example scalar differentiated
    combine: ClassVar[CombineRule] = Mean()
    # Beyond features: "checkpoints" (of each member's training run) | "model" (and the data)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.title = cls.__dict__.get("title") or cls.name
            METHODS.add(cls.name, cls)

    def options(self) -> dict:
        """The options this method was built with (recorded in ``Scores.config``)."""
        return {}

    @property
    def streamable(self) -> bool:
        """Whether the form can be computed from features on disk (out of core)."""
        return True

    @property
    def shared_solve(self) -> bool:
        """Whether members hand over kernels (space ``"kernel"``) that are averaged and
        solved once (:meth:`solve_shared`) instead of solving once per member."""
        return False

    def solve_shared(
        self, kernel: Tensor, cross: Tensor, q: Tensor | None, width: int | None
    ) -> tuple[Tensor, dict]:
        """Scores ``(n_test, n)`` from the members' mean kernel ``(n, n)``, mean test-train
        kernel ``(n_test, n)``, mean Q and their features' total width (None: exact
        gradients), and a record of the solve."""
        raise NotImplementedError(f"method {self.name!r} has no shared solve")

    @property
    def default_projection(self) -> str:
        """The projection ``projection="auto"`` resolves to for this method (``"auto"``:
        the engine's choice between the exact kernel and a factored sketch)."""
        return "auto"

    def expand(self, checkpoints: list[Checkpoint] | None) -> list[tuple[dict | None, float]]:
        """The weighted sub-members a member stands for: ``[(state dict or None for the
        member's own weights, weight)]``. A member's scores are the weighted sum of its
        sub-members' (TracIn: one per checkpoint, weighted by its learning rate)."""
        return [(None, 1.0)]

    @abstractmethod
    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        """One member's scores in factored form, from its training and test features."""

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal | None:
        """Self-influence of every training example without the ``n x n`` scores, or None
        where the method has no shortcut (the engine then scores the training set against
        itself and takes the diagonal)."""
        return None

    @property
    def test_target(self) -> str | None:
        """The scalar differentiated on the *test* side when it differs from ``target``
        (e.g. IF measuring the test output while training by the loss); None: the same."""
        return None

    def curvature(self, seed: int) -> CurvatureSpec | None:
        """The curvature the featurizer must precondition gradients with (None: none)."""
        return None

    @property
    def has_diagonal(self) -> bool:
        """Whether :meth:`diagonal` gives self-influence directly."""
        return type(self).diagonal is not Method.diagonal

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def get_method(name: str | Method, **options: Any) -> Method:
    """A method object from its registered name, built with ``options``."""
    if isinstance(name, Method):
        if options:
            raise ValueError(
                f"options {sorted(options)} were given with a method object; pass them to its "
                "constructor instead"
            )
        return name
    if isinstance(name, type) and issubclass(name, Method):
        cls = name
    elif isinstance(name, str):
        cls = METHODS.get_entry(name)
    else:
        raise TypeError(f"method must be a name or an etda.Method, got {type(name).__name__}")
    import inspect

    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"method {cls.name!r} does not take option(s) {unknown}; "
            f"it accepts {sorted(accepted) or 'none'}"
        )
    return cls(**options)


def method_takes(method: str, option: str) -> bool:
    """Whether the registered method ``method`` accepts keyword ``option``."""
    import inspect

    return option in inspect.signature(METHODS.get_entry(method)).parameters
