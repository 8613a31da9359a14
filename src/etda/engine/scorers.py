"""Scorers: member factors in, combined scores out. Two backends over one block computation.

* :class:`DenseScorer` multiplies each member's factors out for every training column at once
  (one block) and keeps the running sum ``(n_test, n_train)`` in memory;
* :class:`BlockedScorer` (out of core) keeps each member's small left factor (spilled to the
  feature store, so memory stays flat in the number of members) and, once every member is in,
  streams blocks of training columns: each block sums the members' products, is combined,
  written to an ``.npy`` file when the scores do not fit, and merged into the top-k.

Both compute a block with :func:`etda.methods.base.block_scores` and combine with the
method's rule. :class:`SharedKernelScorer` serves methods that solve once for the whole
ensemble (``Method.shared_solve``): it averages the members' kernels and solves at the end.
A member's scores are the weighted sum of its units (TracIn: checkpoints);
members are then combined (``Mean``: averaged; TRAK: kernel and Q averaged separately).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from etda.engine.memory import MemoryBudgetError, MemoryModel, rss_bytes
from etda.features.blocks import StreamedFeatures, TrainFeatures
from etda.io import bar_off
from etda.methods.base import CombineRule, MemberFactors, block_scores

WIDE_BYTES = 512 * 2**20  # float64 training rows a dense feature-space block may widen


@dataclass
class Combined:
    """A scorer's result: the scores (in memory or a memory-mapped ``.npy``), the top-k per
    test example (out of core) and the block width used (None: dense)."""

    values: np.ndarray
    top: dict[str, np.ndarray] | None = None
    block: int | None = None
    info: dict | None = None  # a shared solve's record (damping, form)


class DenseScorer:
    """Sums member scores in memory (see the module doc)."""

    def __init__(self, rule: CombineRule) -> None:
        self.rule = rule
        self.total: Tensor | None = None
        self.q_total: Tensor | None = None
        self.count = 0
        self._member: Tensor | None = None

    def add(self, factors: MemberFactors, train: TrainFeatures, weight: float = 1.0) -> None:
        """One unit of the current member, weighted. Wide explicit features (e.g. exact
        preconditioned gradients) are multiplied out in column blocks, so that no float64
        copy of all training rows is ever held (``WIDE_BYTES`` per block)."""
        width = train.explicit_width if factors.space == "feature" else None
        step = train.n if width is None else max(1, WIDE_BYTES // (8 * width))
        if step >= train.n:
            values = block_scores(factors.left, factors.space, factors.col_scale, train, 0, train.n)
        else:
            values = torch.cat(
                [
                    block_scores(factors.left, "feature", factors.col_scale, train, lo, hi)
                    for lo, hi in ((lo, min(lo + step, train.n)) for lo in range(0, train.n, step))
                ],
                dim=1,
            )
        self.add_values(values, weight)

    def add_values(self, values: Tensor, weight: float = 1.0) -> None:
        self._member = (
            values * weight if self._member is None else self._member.add_(values, alpha=weight)
        )

    def end_member(self, q: Tensor | None) -> None:
        """Close the current member (its Q term, for rules that use one)."""
        if self._member is None:
            raise ValueError("a member ended without scores")
        self.total = self._member * 1.0 if self.total is None else self.total.add_(self._member)
        if self.rule.uses_q:
            if q is None:
                raise ValueError("TRAK combination needs a Q term from every member")
            self.q_total = q.clone() if self.q_total is None else self.q_total.add_(q)
        self._member = None
        self.count += 1

    def result(self) -> Combined:
        if self.total is None:
            raise ValueError("no members were scored")
        return Combined(self.rule.finish(self.total, self.count, self.q_total).numpy())


def _in_memory_advice(
    e: MemoryBudgetError, n_test: int, n_train: int, dense_bytes: int, memory: MemoryModel
) -> str:
    """What to change when in-memory scores cannot be blocked within the budget: the scores
    themselves, or what the process already holds (e.g. wide features of earlier members)."""
    held, budget = rss_bytes() / 2**20, memory.budget / 2**20
    if dense_bytes < memory.budget / 4:
        return (
            f"the process already holds {held:.0f} MiB of the memory budget ({budget:.0f} MiB), "
            f"which leaves no room to score ({n_test} x {n_train} scores, "
            f"{dense_bytes / 2**20:.0f} MiB): raise memory_budget (CLI --max-memory). ({e})"
        )
    return (
        f"the scores ({n_test} x {n_train}, {dense_bytes / 2**20:.0f} MiB) do not fit the "
        f"memory budget ({budget:.0f} MiB; the process holds {held:.0f} MiB): pass "
        "scores_out=PATH (CLI --scores-out) to write them to disk block by block, with top-k "
        "in memory, or raise memory_budget"
    )


class SharedKernelScorer:
    """Averages the members' kernels ``(n, n)``, test-train kernels ``(n_test, n)`` and Q
    terms, and solves once at the end with the method's :meth:`~Method.solve_shared`."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.kernel: Tensor | None = None
        self.cross: Tensor | None = None
        self.q_total: Tensor | None = None
        self.count = 0
        self.width: int | None = 0  # the members' features side by side (None: exact)

    def add(self, factors: MemberFactors, train: TrainFeatures, weight: float = 1.0) -> None:
        if factors.space != "kernel" or factors.kernel is None or factors.left is None:
            raise ValueError("a shared solve needs each member's kernels (space 'kernel')")
        k = train.explicit_width
        self.width = None if k is None or self.width is None else self.width + k
        k, c = factors.kernel.to(torch.float64), factors.left.to(torch.float64)
        self.kernel = k * weight if self.kernel is None else self.kernel.add_(k, alpha=weight)
        self.cross = c * weight if self.cross is None else self.cross.add_(c, alpha=weight)

    def add_values(self, values: Tensor, weight: float = 1.0) -> None:
        raise ValueError("a shared solve takes kernels, not scores")

    def end_member(self, q: Tensor | None) -> None:
        if q is not None:
            self.q_total = q.clone() if self.q_total is None else self.q_total.add_(q)
        self.count += 1

    def result(self) -> Combined:
        if self.kernel is None or self.cross is None:
            raise ValueError("no members were scored")
        q = None if self.q_total is None else self.q_total / self.count
        values, info = self.method.solve_shared(
            self.kernel / self.count, self.cross / self.count, q, self.width
        )
        return Combined(values.numpy(), info=info)


@dataclass
class _Unit:
    left: Tensor | None
    left_file: Path | None
    space: str
    col_scale: Tensor | None
    train: StreamedFeatures
    width: int

    def left_matrix(self) -> Tensor:
        if self.left is not None:
            return self.left.to(torch.float64)
        return torch.from_numpy(np.load(self.left_file, allow_pickle=False)).to(torch.float64)


class BlockedScorer:
    """Out-of-core combination (see the module doc). ``out``: the ``.npy`` file for the
    scores (None: kept in memory, if they fit the budget); ``dtype``: precision in which left
    factors are kept (the features')."""

    def __init__(
        self,
        rule: CombineRule,
        memory: MemoryModel,
        dtype: torch.dtype,
        out: str | os.PathLike | None = None,
        top_k: int = 10,
        progress: bool = False,
    ) -> None:
        self.rule, self.memory, self.dtype = rule, memory, dtype
        self.out, self.top_k, self.progress = out, top_k, progress
        self.units: list[_Unit] = []
        self.qs: list[Tensor] = []
        self.count = 0

    def add(self, factors: MemberFactors, train: StreamedFeatures, weight: float = 1.0) -> None:
        if factors.space != "feature":
            raise ValueError("out-of-core scoring needs a feature-space form")
        folder = train.store.folder
        if factors.left_file is not None and weight == 1.0:  # shared and spilled already
            unit = _Unit(
                None, factors.left_file, "feature", factors.col_scale, train, factors.width
            )
        else:
            left = factors.left if weight == 1.0 else factors.left * weight
            left = left.to(self.dtype)  # the features' precision
            unit = _Unit(left, None, "feature", factors.col_scale, train, int(left.shape[1]))
            if folder is not None:  # on disk until every member is in: memory stays flat
                path = folder.parent / "left.npy"
                np.save(path, left.numpy())
                unit.left, unit.left_file = None, path
                if weight == 1.0:
                    factors.left, factors.left_file = None, path
            self._n_test = int(left.shape[0])
        self.units.append(unit)

    def end_member(self, q: Tensor | None) -> None:
        if self.rule.uses_q:
            if q is None:
                raise ValueError("TRAK combination needs a Q term from every member")
            self.qs.append(q)
        self.count += 1

    def result(self) -> Combined:
        if not self.units:
            raise ValueError("no members to score")
        n_test, n_train = self._n_test, self.units[0].train.n
        q_total = sum(self.qs) if self.qs else None
        top_k = max(0, min(int(self.top_k), n_train))
        dense_bytes = n_test * n_train * 8
        widths = [u.width for u in self.units]
        fixed = self.memory.blocked_fixed(n_test, n_train, top_k, max(widths), q_total is not None)
        in_memory = self.out is None
        if in_memory:
            fixed += dense_bytes
        try:
            block = self.memory.score_block(n_test, widths, fixed, n_train)
        except MemoryBudgetError as e:
            if in_memory:
                advice = _in_memory_advice(e, n_test, n_train, dense_bytes, self.memory)
                raise MemoryBudgetError(advice) from None
            raise
        writer = _ScoresFile(Path(self.out), n_test, n_train) if self.out is not None else None
        values = None if writer is not None else np.empty((n_test, n_train), dtype=np.float64)
        top = _TopK(n_test, top_k)
        bar = tqdm(
            total=n_train,
            desc="scoring blocks",
            unit="ex",
            leave=False,
            disable=bar_off(self.progress),
        )
        for lo in range(0, n_train, block):
            hi = min(lo + block, n_train)
            acc = torch.zeros(n_test, hi - lo, dtype=torch.float64)
            for u in self.units:
                acc += block_scores(u.left_matrix(), "feature", u.col_scale, u.train, lo, hi)
            acc = self.rule.finish(acc, self.count, q_total, lo)
            if writer is not None:
                writer.write(lo, acc.numpy())
            else:
                values[:, lo:hi] = acc.numpy()  # type: ignore[index]
            top.merge(acc, lo)
            bar.update(hi - lo)
        bar.close()
        if writer is not None:
            values = np.load(writer.path, mmap_mode="r")
        return Combined(values, top.arrays(), block)  # type: ignore[arg-type]


class _TopK:
    """The running top-k proponents and opponents of every test example."""

    def __init__(self, n_test: int, k: int) -> None:
        self.k = k
        self.best_v = torch.full((n_test, 0), 0.0, dtype=torch.float64)
        self.best_i = torch.zeros((n_test, 0), dtype=torch.long)
        self.worst_v, self.worst_i = self.best_v.clone(), self.best_i.clone()

    def merge(self, block: Tensor, lo: int) -> None:
        if not self.k:
            return
        idx = torch.arange(lo, lo + block.shape[1]).expand(block.shape[0], -1)
        self.best_v, self.best_i = _merge(self.best_v, self.best_i, block, idx, self.k, True)
        self.worst_v, self.worst_i = _merge(self.worst_v, self.worst_i, block, idx, self.k, False)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "proponents": self.best_i.numpy(),
            "proponent_scores": self.best_v.numpy(),
            "opponents": self.worst_i.numpy(),
            "opponent_scores": self.worst_v.numpy(),
        }


def _merge(
    vals: Tensor, idx: Tensor, block: Tensor, block_idx: Tensor, k: int, largest: bool
) -> tuple[Tensor, Tensor]:
    v = torch.cat([vals, block], 1)
    i = torch.cat([idx, block_idx], 1)
    top, pos = torch.topk(v, min(k, v.shape[1]), dim=1, largest=largest, sorted=True)
    return top, i.gather(1, pos)


class _ScoresFile:
    """A row-major float32 ``.npy`` matrix written one block of columns at a time."""

    def __init__(self, path: Path, n_test: int, n_train: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_test, n_train))
        self.path, self.offset, self.shape = path, mm.offset, (n_test, n_train)
        del mm

    def write(self, lo: int, block: np.ndarray) -> None:
        """Columns ``[lo, lo + b)``; the mapping is dropped right after, so written pages do
        not stay in this process's memory."""
        mm = np.memmap(self.path, dtype=np.float32, mode="r+", offset=self.offset, shape=self.shape)
        mm[:, lo : lo + block.shape[1]] = block
        mm.flush()
        del mm
