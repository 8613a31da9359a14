"""Trajectory ensembles: members are continuations of one trained run.

* :class:`Snapshots` — train each given model on for ``members`` cycles and keep the model
  at the end of every cycle (fast geometric ensembling / snapshot ensembles with a
  ``"cyclic"`` learning rate that restarts at ``lr`` and decays to 0 in each cycle; SWA-style
  with a ``"constant"`` one). The snapshots are full-quality models of one trajectory.
* :class:`Forks` — ``members`` independent continuations of each given model, each with its
  own data order (and, with ``subset``, its own random part of the training set): cheaper
  than independent runs when the given model is a late checkpoint of one.

Both train (their seconds count as training cost), deterministically from the ensemble's
seed, with etda's training loop and the run's task, or with the user's
``train_fn(model, x, y, seed)`` that trains one cycle / one continuation in place.

Where etda knows the run's recipe (its built-in settings, ``etda attribute -s ... -e
snapshots``), ``tail`` and ``at`` place the members in the run: Snapshots replace the last
``tail`` of the run's epochs by ``members`` cycles that restart at the rate the run had
there (one run's training in all); Forks continue the checkpoint at ``at`` of the run to its
end, each with its own data order. With your own model, members continue from the model you
pass, with ``epochs``, ``lr`` and ``optimizer`` as given.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from etda import batch
from etda.ensemble.base import (
    BuildContext,
    Ensemble,
    Member,
    check_members,
    member_seed,
    prepared_copy,
)

SCHEDULES = ("cyclic", "constant")
TrainFn = Callable[[nn.Module, Any, Any, int], None]


class _Continuation(Ensemble):
    """Shared training of trajectory members: a recipe, a seed, a training function."""

    trains_members = True

    def __init__(
        self,
        members: int,
        epochs: int,
        lr: float,
        schedule: str,
        optimizer: str,
        batch_size: int,
        weight_decay: float,
        seed: int | None,
        train_fn: TrainFn | None,
    ) -> None:
        check_members(members)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.n_members, self.epochs, self.lr, self.schedule = members, epochs, float(lr), schedule
        self.optimizer, self.batch_size, self.weight_decay = optimizer, batch_size, weight_decay
        self.seed, self.train_fn = seed, train_fn

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    def key_parts(self) -> list[str]:
        return [f"e{self.epochs}lr{self.lr:g}"]

    @staticmethod
    def _data(ctx: BuildContext) -> tuple[Any, Any]:
        """The training set in memory, in the run's dtype, read once for all members
        (shuffled minibatches need random access, also for streamed data)."""
        return batch.cast(batch.materialize(ctx.x_train), ctx.dtype), ctx.y_train

    def _train(
        self, model: nn.Module, ctx: BuildContext, data: tuple, seed: int, keep: Any
    ) -> float:
        """Train ``model`` in place for ``self.epochs`` at ``self.schedule`` on the kept
        examples of ``data`` (None: all); return the seconds."""
        from etda.train import TrainRecipe, train_model

        x, y = data
        if keep is not None:
            index = torch.as_tensor(np.flatnonzero(keep))
            x, y = batch.select(x, index), y[index]
        t0 = time.perf_counter()
        model.train()
        if self.train_fn is not None:
            self.train_fn(model, x, y, seed)
        elif self.epochs > 0:
            recipe = TrainRecipe(
                optimizer=self.optimizer,
                lr=self.lr,
                weight_decay=self.weight_decay,
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr_schedule="linear" if self.schedule == "cyclic" else "constant",
            )
            train_model(model, x, y, recipe, seed=seed, task=ctx.task)
        model.eval()
        return time.perf_counter() - t0


class Snapshots(_Continuation):
    """``members`` snapshots per given model: ``members`` cycles of ``epochs`` epochs each,
    continuing from the model, a snapshot after every cycle (see the module doc)."""

    name = "snapshots"
    presets = {
        "snapshots": (
            "snapshots of one run continued with a cyclic learning rate (one per cycle)",
            "snapshots",
            {},
        )
    }

    def __init__(
        self,
        members: int = 5,
        epochs: int = 1,
        lr: float = 0.01,
        schedule: str = "cyclic",
        optimizer: str = "sgd",
        batch_size: int = 100,
        weight_decay: float = 5e-4,
        seed: int | None = None,
        train_fn: TrainFn | None = None,
        tail: float | None = 0.25,
    ) -> None:
        if tail is not None and not 0 < tail <= 1:
            raise ValueError(f"tail must be a fraction of the run in (0, 1], got {tail!r}")
        super().__init__(
            members, epochs, lr, schedule, optimizer, batch_size, weight_decay, seed, train_fn
        )
        self.tail = tail

    def key_parts(self) -> list[str]:
        return [*super().key_parts(), self.schedule, *([f"tail{self.tail:g}"] if self.tail else [])]

    def run_start(self, epochs: int) -> int | None:
        return None if self.tail is None else epochs - _tail_epochs(self.tail, epochs)

    def fit_run(self, recipe: Any) -> Snapshots:
        """Cycles of the run's tail: ``tail * epochs / members`` epochs each (at least one),
        restarting at the rate the run had where the tail begins."""
        if self.tail is None:
            return self
        tail = _tail_epochs(self.tail, recipe.epochs)
        return _with(
            self,
            epochs=max(1, tail // self.n_members),
            lr=_rate_at(recipe, recipe.epochs - tail),
            **_recipe_options(recipe),
        )

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        data = self._data(ctx)
        for k, model in enumerate(models):
            current = prepared_copy(model, ctx.dtype)
            for j in range(self.n_members):
                s = member_seed(seed, k, j)
                seconds = self._train(current, ctx, data, s, None)
                snapshot = copy.deepcopy(current)
                yield Member(
                    snapshot,
                    s,
                    f"model{k}-snapshot{j}",
                    train_s=seconds,
                    extra_weight_names=_all_weights(snapshot),  # a new model to keep
                    model_index=k,
                    info={"cycle": j, "train_seed": s},
                )


class Forks(_Continuation):
    """``members`` continuations per given model, each ``epochs`` epochs with its own data
    order and, with ``subset`` (a fraction), its own seeded random part of the training set;
    ``"cyclic"``: the rate decays from ``lr`` to 0 over the fork (one cycle). ``epochs=0``
    makes every fork the given model itself."""

    name = "forks"
    presets = {
        "forks": (
            "continuations of one run with their own data order (optionally on subsets)",
            "forks",
            {},
        )
    }

    def __init__(
        self,
        members: int = 5,
        epochs: int = 2,
        lr: float = 0.01,
        subset: float | None = None,
        schedule: str = "cyclic",
        optimizer: str = "sgd",
        batch_size: int = 100,
        weight_decay: float = 5e-4,
        seed: int | None = None,
        train_fn: TrainFn | None = None,
        at: float | None = 0.5,
    ) -> None:
        if subset is not None and not 0 < subset <= 1:
            raise ValueError(f"subset must be a fraction in (0, 1], got {subset!r}")
        if at is not None and not 0 <= at <= 1:
            raise ValueError(f"at must be a fraction of the run in [0, 1], got {at!r}")
        super().__init__(
            members, epochs, lr, schedule, optimizer, batch_size, weight_decay, seed, train_fn
        )
        self.subset, self.at = subset, at

    def key_parts(self) -> list[str]:
        parts = [*super().key_parts(), *([f"sub{self.subset:g}"] if self.subset else [])]
        return parts + ([f"at{self.at:g}"] if self.at is not None else [])

    def run_start(self, epochs: int) -> int | None:
        return None if self.at is None else int(round(self.at * epochs))

    def fit_run(self, recipe: Any) -> Forks:
        """Forks from epoch ``at * epochs`` to the run's end, at the run's own rates (a
        linear decay from where the run was; ``at=1``: the final model, untrained)."""
        if self.at is None:
            return self
        start = int(round(self.at * recipe.epochs))
        return _with(
            self,
            epochs=recipe.epochs - start,
            lr=max(_rate_at(recipe, start), 1e-12),
            **_recipe_options(recipe),
        )

    def keep_mask(self, n: int, seed: int) -> np.ndarray | None:
        """The fork's training examples: a seeded random ``subset`` of ``n`` (None: all)."""
        if self.subset is None:
            return None
        rng = np.random.Generator(np.random.PCG64(seed))
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, max(1, int(round(self.subset * n))), replace=False)] = True
        return keep

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        data = self._data(ctx)
        for k, model in enumerate(models):
            for j in range(self.n_members):
                s = member_seed(seed, k, j)
                fork = prepared_copy(model, ctx.dtype)
                keep = self.keep_mask(batch.n_rows(ctx.x_train), s)
                seconds = self._train(fork, ctx, data, s, keep)
                yield Member(
                    fork,
                    s,
                    f"model{k}-fork{j}",
                    train_s=seconds,
                    extra_weight_names=_all_weights(fork) if self.epochs else [],
                    model_index=k,
                    info={"train_seed": s, "subset": self.subset},
                )


def _tail_epochs(tail: float, epochs: int) -> int:
    return min(epochs, max(1, int(round(tail * epochs))))


def _rate_at(recipe: Any, epoch: int) -> float:
    """The run's learning rate at the start of ``epoch`` (its recipe's schedule)."""
    return recipe.lr_at_epoch(epoch)


def _recipe_options(recipe: Any) -> dict:
    return {
        "optimizer": recipe.optimizer,
        "batch_size": recipe.batch_size,
        "weight_decay": recipe.weight_decay,
    }


def _with(ens: _Continuation, **changes: Any) -> Any:
    """A copy of ``ens`` with some training options changed."""
    out = copy.copy(ens)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def _all_weights(model: nn.Module) -> list[str]:
    """Every parameter: a trained member is a whole model to store (its space cost)."""
    return [name for name, _ in model.named_parameters()]
