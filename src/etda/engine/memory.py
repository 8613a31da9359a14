"""The memory model: every formula that turns ``memory_budget`` into a decision.

Bytes are estimated, not measured, except the process's resident memory (``rss``), which
the out-of-core decisions subtract from the budget: a budget is for the whole process.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

MIN_BLOCK = 64  # fewest training columns a score block may hold
MAX_BLOCK = 8192  # more columns per block buy no speed, only memory
HEADROOM = 0.75  # share of the free budget a block may plan for (allocator, temporaries)
DEFAULT_SKETCH_DIM = 2048  # k of the factored sketch when the exact kernel does not fit


class MemoryBudgetError(MemoryError):
    """The memory budget cannot hold even the smallest block of the computation."""


def rss_bytes() -> int:
    """Resident memory of this process now (bytes)."""
    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class MemoryModel:
    """Memory decisions of one run under ``budget`` bytes."""

    budget: int

    def exact_kernel_fits(self, n_train: int) -> bool:
        """A few ``n x n`` float64 matrices (the exact sample-space kernel and its solve)."""
        return 4 * 8 * n_train**2 <= self.budget

    def exact_features_fit(self, width: int, n: int) -> bool:
        """Exact (unprojected) float32 features of ``n`` examples in half the budget."""
        return 4 * n * width <= self.budget // 2

    def chunk_size(self, n_params: int, itemsize: int) -> int:
        """Examples per featurizer call: per-example gradients of a chunk, with room for
        their temporaries, in a sixteenth of the budget (at most 512)."""
        return int(max(1, min(512, self.budget // (16 * n_params * itemsize))))

    @staticmethod
    def dense_need(n_train: int, n_test: int, k: int) -> int:
        """Bytes the dense path holds at its peak: one member's training features in float64
        twice (matrix and solve) plus three ``(n_test, n_train)`` float64 score matrices."""
        return 16 * n_train * k + 24 * n_train * n_test

    def dense_fits(self, n_train: int, n_test: int, k: int | None) -> bool:
        """Whether the dense path fits what the budget leaves this process (a budget below
        what the process already holds cannot be met either way: then the dense path runs)."""
        room = self.budget - rss_bytes()
        need = self.dense_need(n_train, n_test, k or DEFAULT_SKETCH_DIM)
        return not (0 < room < need)

    def stream_rows(self, k: int | None) -> int:
        """Training rows read per step when streaming stored features (Gram pass)."""
        return max(64, min(8192, self.budget // 16 // (12 * (k or DEFAULT_SKETCH_DIM))))

    @staticmethod
    def blocked_fixed(n_test: int, n_train: int, top_k: int, k_max: int, has_q: bool) -> int:
        """What blocked scoring holds besides its block: the process now, the top-k, Q, and
        one member's left factor read back per block."""
        fixed = rss_bytes() + 2 * n_test * top_k * 16 + (n_train * 8 if has_q else 0)
        return fixed + 16 * n_test * k_max

    def score_block(self, n_test: int, widths: list[int], fixed: int, n_train: int) -> int:
        """Training columns per block (at most ``MAX_BLOCK``) so that the working set fits
        ``HEADROOM`` of what the budget leaves after ``fixed`` bytes. Per column: every
        member's row read and widened to float64 (``12 k`` bytes, one member at a time) plus
        the float64 accumulator and one product (``16 n_test``)."""
        per_col = 12 * max(widths) + 16 * n_test + 64
        room = int(HEADROOM * (self.budget - fixed))
        block = room // per_col if room > 0 else 0
        if block < min(MIN_BLOCK, n_train):
            need = fixed + int(per_col * min(MIN_BLOCK, n_train) / HEADROOM)
            raise MemoryBudgetError(
                f"memory budget {self.budget / 2**20:.0f} MiB cannot hold one block of the "
                f"scores: {need / 2**20:.0f} MiB are needed for {min(MIN_BLOCK, n_train)} "
                f"training columns ({fixed / 2**20:.0f} MiB of it fixed: the process, "
                "test-side factors and top-k); raise --max-memory, lower proj_dim, or score "
                "fewer test examples at a time"
            )
        return int(min(block, MAX_BLOCK, n_train))
