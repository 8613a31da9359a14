"""Ensembles: how members are made. A member is a ready-to-featurize model plus its seeds.

Members are produced lazily, one at a time, so memory does not grow with the member
count. Every member is reproducible from the ensemble's seed and its position.

An ensemble class declares what it provides (``provides``: e.g. LoRA adapters' epoch
checkpoints, which TracIn can use), whether its given models are checkpoints of one run
(``members_are_checkpoints``), whether making members trains something (``trains_members``),
and registers one *preset* per named kind (``presets``): ``"dropout"``, ``"dropout-forward"``,
... are presets of :class:`etda.Dropout`. The registry ``ENSEMBLES`` maps preset names to
builders, which is how the CLI, sweeps and tests construct ensembles from options.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from etda.registry import Registry
from etda.seeding import derive_seed
from etda.task import ParamSelector, Task


@dataclass
class Member:
    """One ensemble member.

    ``model``: the module to featurize (a copy; masks or adapters installed);
    ``projection_seed``: seed of its random projection;
    ``feature_key``: members with equal keys share one featurization (forward-only
    dropout) and differ only in ``q_model``, the model whose forward pass gives Q;
    ``checkpoints``: ``[(state_dict, lr)]`` of the member's own training (e.g. adapter
    epochs), for methods that need checkpoints (None: use the ones given to the run);
    ``train_s``: seconds spent making this member (e.g. fine-tuning an adapter);
    ``extra_weight_names``/``extra_weights_bytes``: the weights it adds to the given models
    (by name in ``model``, or in bytes where ``model`` merged them in).
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
    extra_weights_bytes: int = 0  # bytes it adds that ``model`` no longer holds (merged adapters)
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


@dataclass(frozen=True)
class Preset:
    """A named kind of ensemble: a class with some arguments fixed."""

    name: str
    cls: type[Ensemble]
    description: str
    short: str  # label in plots and tables, e.g. "dropout/ex"
    fixed: dict[str, Any] = field(default_factory=dict)

    def accepts(self) -> list[str]:
        """Options the preset takes (the class's arguments it does not fix)."""
        params = inspect.signature(self.cls).parameters
        return [p for p in params if p not in self.fixed]

    @property
    def default_members(self) -> int:
        p = inspect.signature(self.cls).parameters.get("members")
        return int(p.default) if p is not None and isinstance(p.default, int) else 1

    def build(self, **options: Any) -> Ensemble:
        """The ensemble with ``options`` (``None`` values mean the default)."""
        options = {k: v for k, v in options.items() if v is not None}
        accepted = self.accepts()
        if "members" in options and "members" not in accepted and options.pop("members") != 1:
            raise ValueError(
                f"ensemble {self.name!r} has exactly one member per trained model; train "
                "more models instead, or choose a cheap ensemble"
            )
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            others = [
                n for n, p in ENSEMBLES.items() if n != self.name and unknown[0] in p.accepts()
            ]
            hint = f" ({unknown[0]!r} is an option of {', '.join(others)})" if others else ""
            raise ValueError(
                f"ensemble {self.name!r} does not take option(s) {unknown}; it takes "
                f"{', '.join(accepted) or 'none'}{hint}"
            )
        return self.cls(**self.fixed, **options)


ENSEMBLES: Registry[Preset] = Registry("ensemble")


def make_ensemble(kind: str, **options: Any) -> Ensemble:
    """The ensemble of preset ``kind`` (a key of ``ENSEMBLES``) built with ``options``."""
    return ENSEMBLES.get_entry(kind).build(**options)


class Ensemble(ABC):
    """Base class: ``members(models, ctx)`` yields members, one at a time."""

    name: ClassVar[str] = "ensemble"  # recorded as ``kind`` in Scores.config
    # name -> (description, short label, fixed arguments)
    presets: ClassVar[dict[str, tuple[str, str, dict[str, Any]]]] = {}
    provides: ClassVar[frozenset[str]] = frozenset()  # "checkpoints"
    members_are_checkpoints: ClassVar[bool] = False  # the given models are one run's checkpoints
    trains_members: ClassVar[bool] = False  # making a member trains (costs training time)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, (description, short, fixed) in cls.__dict__.get("presets", {}).items():
            ENSEMBLES.add(name, Preset(name, cls, description, short, dict(fixed)))

    @abstractmethod
    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]: ...

    @abstractmethod
    def size(self, n_models: int) -> int:
        """Number of members for ``n_models`` given models."""

    @property
    def varies_features(self) -> bool:
        """False when members differ only in TRAK's Q term (one featurization for all)."""
        return True

    @property
    def kind(self) -> str:
        """The preset name describing this ensemble (the most specific that matches)."""
        own = type(self).__dict__.get("presets", {})
        matches = [
            (len(fixed), name)
            for name, (_, _, fixed) in own.items()
            if all(getattr(self, k, object()) == v for k, v in fixed.items())
        ]
        return max(matches)[1] if matches else self.name

    def for_model(self, model: nn.Module, adapt: bool = False) -> tuple[Ensemble, str]:
        """Check that members can be made from ``model`` (ValueError if not); with ``adapt``,
        the ensemble adjusted to it where that has a sensible default, and a note saying so."""
        return self, ""

    def key_parts(self) -> list[str]:
        """Options that name a benchmark configuration beyond the kind and member count."""
        return []

    def run_start(self, epochs: int) -> int | None:
        """For ensembles that continue a run: the epoch (of a run of ``epochs``) whose
        checkpoint the members start from, when the run's recipe is known; None: the given
        model as it is."""
        return None

    def fit_run(self, recipe: Any) -> Ensemble:
        """This ensemble with its training options taken from the run's recipe (a
        ``etda.train.TrainRecipe``), where it has any; itself otherwise."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "preset": self.kind,
            **{
                k: (getattr(v, "__qualname__", repr(v)) if callable(v) else v)
                for k, v in vars(self).items()
                if not k.startswith("_")
            },
        }


def member_seed(seed: int, model_index: int, member_index: int) -> int:
    return derive_seed(seed, model_index, member_index) % (2**31)


def prepared_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` in ``dtype`` (the user's model is never modified)."""
    m = copy.deepcopy(model).to(dtype)
    m.eval()
    return m


def check_members(members: int) -> None:
    if isinstance(members, bool) or not isinstance(members, int) or members <= 0:
        raise ValueError(f"members must be a positive integer, got {members!r}")


class Independent(Ensemble):
    """One member per given model (the naive independent ensemble); ``ensemble=None``."""

    name = "independent"
    presets = {
        "none": ("one member per trained model (the naive independent ensemble)", "naive", {})
    }

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
    """Members = checkpoints of one training run (pass the checkpoint models as ``models``).

    ``members``: how many checkpoints per run etda's own settings take (evenly spaced over the
    run's epochs); with your own checkpoint models, every model given is a member."""

    name = "checkpoints"
    presets = {
        "checkpoints": (
            "checkpoints of one training run, evenly spaced over its epochs",
            "checkpoints",
            {},
        )
    }
    members_are_checkpoints = True

    def __init__(self, seed: int | None = None, members: int = 5) -> None:
        check_members(members)
        super().__init__(seed)
        self.n_members = members

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
    presets = {
        "projection-seeds": (
            "the same model with different projection seeds (a baseline)",
            "proj-seeds",
            {},
        )
    }

    def __init__(self, members: int = 10, seed: int | None = None) -> None:
        check_members(members)
        self.n_members, self.seed = members, seed

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, m in enumerate(models):
            base = prepared_copy(m, ctx.dtype)
            for j in range(self.n_members):
                yield Member(base, member_seed(seed, k, j), f"model{k}-proj{j}", model_index=k)
