"""Out-of-core scoring: bounded memory however many training examples and members.

The dense path holds each member's score matrix ``(n_test, n_train)`` and its features in
memory. Every method over *explicit* (projected) features factors instead as

    ``tau_m = left_m @ Phi_m^T * col_scale_m``     (``left_m``: ``(n_test, k)``)

with ``left_m`` small (TRAK/IF: ``phi_test (Phi^T Phi + lam I)^-1``; Grad-Dot: ``phi_test``;
Grad-Cos: normalized ``phi_test`` and ``col_scale = 1 / |phi_train|``). So a run keeps only
``left_m``, the ``k x k`` Gram matrix while it is streamed, and one block of training rows at
a time: phase 1 streams each member's stored training features once (Gram, norms, Q);
phase 2 streams them again per block of training columns, summing the members' products.
Scores go to an ``.npy`` file on disk block by block when they do not fit the budget, and
the ``top_k`` proponents/opponents of every test example are kept in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from etda.features import blocks as fb
from etda.features.store import SplitStore

MIN_BLOCK = 64  # fewest training columns a block may hold
MAX_BLOCK = 8192  # more columns per block buy no speed, only memory
HEADROOM = 0.75  # share of the free budget a block may plan for (allocator, temporaries)


class MemoryBudgetError(MemoryError):
    """The memory budget cannot hold even the smallest block of the computation."""


def rss_bytes() -> int:
    """Resident memory of this process now (bytes; 0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def feature_key(st: SplitStore) -> str:
    """The store's explicit feature block (``phi`` or ``g``); exact factors cannot stream."""
    keys = [k for k in fb.EXPLICIT if k in st.widths]
    if len(keys) != 1 or any(k[0] in "da" and k[1:].isdigit() for k in st.widths):
        raise ValueError(
            "out-of-core scoring needs explicit (projected) features; the exact kernel "
            "(projection 'none') is n x n: pass proj_dim=... (CLI --proj-dim) or a larger "
            "memory budget"
        )
    return keys[0]


@dataclass
class TrainStats:
    """One streaming pass over a member's stored training features."""

    gram: Tensor  # (k, k) float64: Phi^T Phi
    sq_norms: Tensor  # (n_train,) float64
    q: Tensor | None  # (n_train,) float64, when the store has TRAK's Q


def train_stats(st: SplitStore, block: int, gram: bool = True) -> TrainStats:
    """Gram matrix, squared row norms and Q of a stored split, ``block`` rows at a time."""
    key = feature_key(st)
    k = st.widths[key]
    g = torch.zeros(k, k, dtype=torch.float64) if gram else torch.zeros(0, 0)
    norms = torch.empty(st.n, dtype=torch.float64)
    q = torch.empty(st.n, dtype=torch.float64) if "q" in st.widths else None
    for lo in range(0, st.n, block):
        hi = min(lo + block, st.n)
        rows = st.rows(lo, hi, [key] + (["q"] if q is not None else []))
        phi = rows[key].to(torch.float64)
        if gram:
            g.addmm_(phi.T, phi)
        norms[lo:hi] = (phi * phi).sum(1)
        if q is not None:
            q[lo:hi] = rows["q"][:, 0].to(torch.float64)
    return TrainStats(g, norms, q)


@dataclass
class MemberFactors:
    """``tau = left @ Phi_train^T * col_scale`` for one member (see the module doc).

    ``left`` is ``(n_test, k)`` in float64 or the features' dtype (widened per block); once
    :meth:`spill` has written it to ``left_file`` it is read back per block instead, so the
    memory of a run does not grow with its number of members."""

    left: Tensor | None
    train: SplitStore
    col_scale: Tensor | None = None  # (n_train,) float64
    q: Tensor | None = None  # (n_train,) TRAK's Q term
    info: dict = field(default_factory=dict)
    left_file: Path | None = None
    shape: tuple[int, int] = (0, 0)  # of left

    def __post_init__(self) -> None:
        if self.left is not None:
            self.shape = tuple(self.left.shape)  # type: ignore[assignment]

    def spill(self, path: Path) -> MemberFactors:
        """Write ``left`` to ``path`` (``.npy``) and drop it from memory."""
        np.save(path, self.left.numpy())  # type: ignore[union-attr]
        return replace(self, left=None, left_file=path)

    def left_matrix(self) -> Tensor:
        """``left`` as float64, from memory or read back from its file."""
        if self.left is not None:
            return self.left.to(torch.float64)
        return torch.from_numpy(np.load(self.left_file, allow_pickle=False)).to(torch.float64)


@dataclass
class BlockedScores:
    """Result of :func:`score_blocked`: the scores (in memory or a memory-mapped ``.npy``)
    and the top-k training examples per test example."""

    values: np.ndarray  # (n_test, n_train)
    top: dict[str, np.ndarray]  # proponents/opponents: indices and scores, (n_test, top_k)
    block: int
    path: Path | None


def plan_block(n_test: int, widths: list[int], fixed: int, budget: int, n_train: int) -> int:
    """Training columns per block (at most ``MAX_BLOCK``) so that the working set fits
    ``HEADROOM`` of what ``budget`` leaves after ``fixed`` bytes. Per column: every
    member's row read and widened to float64 (``12 k`` bytes, one member at a time) plus
    the float64 accumulator and one product (``16 n_test``)."""
    per_col = 12 * max(widths) + 16 * n_test + 64
    room = int(HEADROOM * (budget - fixed))
    block = room // per_col if room > 0 else 0
    if block < min(MIN_BLOCK, n_train):
        need = fixed + int(per_col * min(MIN_BLOCK, n_train) / HEADROOM)
        raise MemoryBudgetError(
            f"memory budget {budget / 2**20:.0f} MiB cannot hold one block of the scores: "
            f"{need / 2**20:.0f} MiB are needed for {min(MIN_BLOCK, n_train)} training "
            f"columns ({fixed / 2**20:.0f} MiB of it fixed: the process, test-side factors "
            "and top-k); raise --max-memory, lower proj_dim, or score fewer test examples "
            "at a time"
        )
    return int(min(block, MAX_BLOCK, n_train))


def score_blocked(
    factors: list[MemberFactors],
    rule: str,
    n_train: int,
    budget: int,
    out: str | os.PathLike | None = None,
    top_k: int = 10,
    progress: bool = False,
) -> BlockedScores:
    """Combine member factors into scores, one block of training columns at a time.

    ``rule``: ``"mean"`` (scores averaged) or ``"trak"`` (kernel term averaged, times the
    averaged Q). ``out``: write the ``(n_test, n_train)`` float32 scores to this ``.npy``
    file (required when they do not fit in memory). ``budget``: bytes the whole process
    may hold (its current resident memory counts against it)."""
    if not factors:
        raise ValueError("no members to score")
    n_test = factors[0].shape[0]
    m = len(factors)
    q = None
    if rule == "trak":
        if any(f.q is None for f in factors):
            raise ValueError("TRAK combination needs a Q term from every member")
        q = sum(f.q for f in factors) / m  # type: ignore[misc]
    top_k = max(0, min(int(top_k), n_train))
    dense_bytes = n_test * n_train * 8
    # fixed: the process now, the top-k, Q, and one member's left factor read back per block
    k_max = max(f.shape[1] for f in factors)
    fixed = rss_bytes() + 2 * n_test * top_k * 16 + (n_train * 8 if q is not None else 0)
    fixed += 16 * n_test * k_max
    in_memory = out is None
    if in_memory:
        fixed += dense_bytes
    widths = [f.shape[1] for f in factors]
    try:
        block = plan_block(n_test, widths, fixed, budget, n_train)
    except MemoryBudgetError:
        if in_memory:
            raise MemoryBudgetError(
                f"the scores ({n_test} x {n_train}, {dense_bytes / 2**20:.0f} MiB) do not fit "
                f"the memory budget ({budget / 2**20:.0f} MiB): pass scores_out=PATH (CLI "
                "--scores-out) to write them to disk block by block, with top-k in memory"
            ) from None
        raise
    path = Path(out) if out is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_test, n_train))
        offset = mm.offset
        del mm
        values = None
    else:
        values = np.empty((n_test, n_train), dtype=np.float64)
    best_v = torch.full((n_test, 0), 0.0, dtype=torch.float64)
    best_i = torch.zeros((n_test, 0), dtype=torch.long)
    worst_v, worst_i = best_v.clone(), best_i.clone()
    bar = tqdm(total=n_train, desc="scoring blocks", unit="ex", leave=False, disable=not progress)
    for lo in range(0, n_train, block):
        hi = min(lo + block, n_train)
        acc = torch.zeros(n_test, hi - lo, dtype=torch.float64)
        for f in factors:
            phi = f.train.rows(lo, hi, [feature_key(f.train)])
            part = f.left_matrix() @ next(iter(phi.values())).to(torch.float64).T
            if f.col_scale is not None:
                part *= f.col_scale[lo:hi][None, :]
            acc += part
        acc /= m
        if q is not None:
            acc *= q[lo:hi][None, :]
        if values is not None:
            values[:, lo:hi] = acc.numpy()
        else:
            _write_columns(path, offset, n_test, n_train, lo, acc.numpy())  # type: ignore[arg-type]
        if top_k:
            idx = torch.arange(lo, hi).expand(n_test, -1)
            best_v, best_i = _merge(best_v, best_i, acc, idx, top_k, largest=True)
            worst_v, worst_i = _merge(worst_v, worst_i, acc, idx, top_k, largest=False)
        bar.update(hi - lo)
    bar.close()
    if path is not None:
        values = np.load(path, mmap_mode="r")
    top = {
        "proponents": best_i.numpy(),
        "proponent_scores": best_v.numpy(),
        "opponents": worst_i.numpy(),
        "opponent_scores": worst_v.numpy(),
    }
    return BlockedScores(values, top, block, path)  # type: ignore[arg-type]


def _merge(
    vals: Tensor, idx: Tensor, block: Tensor, block_idx: Tensor, k: int, largest: bool
) -> tuple[Tensor, Tensor]:
    v = torch.cat([vals, block], 1)
    i = torch.cat([idx, block_idx], 1)
    kk = min(k, v.shape[1])
    top, pos = torch.topk(v, kk, dim=1, largest=largest, sorted=True)
    return top, i.gather(1, pos)


def _write_columns(
    path: Path, offset: int, n_test: int, n_train: int, lo: int, block: np.ndarray
) -> None:
    """Write columns ``[lo, lo + b)`` of a row-major float32 ``.npy`` matrix; the mapping is
    dropped right after, so written pages do not stay in this process's memory."""
    mm = np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=(n_test, n_train))
    mm[:, lo : lo + block.shape[1]] = block
    mm.flush()
    del mm
