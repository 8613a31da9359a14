"""Random projections of per-example gradients, all generated from a seed.

Two families:

* flat projectors map a flattened gradient ``g (B, p)`` to ``(B, k)``: identity, dense
  Gaussian/Rademacher (generated blockwise, never materialized beyond a memory budget)
  and sparse JL (count sketch);
* factored sketches map a Linear/Conv layer's per-example outer products
  ``sum_l D[:, l] (x) A[:, l]`` (``D (B, L, o)``, ``A (B, L, i)``) to ``(B, k)`` without
  forming the ``o * i`` gradient: TensorSketch (count sketches of D and A combined by
  FFT), the LoGra/GraSS idea.

All sketches are unbiased for inner products: E[<Pg, Pg'>] = <g, g'>.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from etda.seeding import generator

_KEY_DENSE = 11
_KEY_COUNT = 13
_KEY_TENSOR = 17


class FlatProjector(ABC):
    """Projects flattened gradients ``(B, p) -> (B, k)``."""

    dim: int

    @abstractmethod
    def __call__(self, g: Tensor, offset: int = 0) -> Tensor:
        """Project columns ``offset : offset + g.shape[1]`` of the full gradient."""


class Identity(FlatProjector):
    def __init__(self, n_params: int) -> None:
        self.dim = n_params

    def __call__(self, g: Tensor, offset: int = 0) -> Tensor:
        return g


class DenseProjector(FlatProjector):
    """Dense JL projection ``g P^T / sqrt(k)`` with Gaussian or Rademacher ``P (k, p)``.

    ``P`` is generated in column blocks of ``block`` parameters, each from its own seed,
    so the result does not depend on how examples are chunked. Blocks are cached while
    the cache stays within ``cache_bytes``.
    """

    def __init__(
        self,
        n_params: int,
        dim: int,
        seed: int,
        kind: str = "gaussian",
        block: int = 16384,
        cache_bytes: int = 1 << 30,
    ) -> None:
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown dense projection kind {kind!r}")
        self.n_params, self.dim, self.seed, self.kind, self.block = n_params, dim, seed, kind, block
        self._cache: dict[tuple[int, torch.dtype], Tensor] = {}
        self._cache_ok = dim * n_params * 4 <= cache_bytes

    def _block(self, b: int, dtype: torch.dtype) -> Tensor:
        key = (b, dtype)
        if key in self._cache:
            return self._cache[key]
        width = min(self.block, self.n_params - b * self.block)
        g = generator(self.seed, _KEY_DENSE, b)
        if self.kind == "gaussian":
            p = torch.randn(width, self.dim, generator=g, dtype=torch.float64)
        else:
            p = torch.randint(0, 2, (width, self.dim), generator=g).to(torch.float64) * 2 - 1
        p = (p / math.sqrt(self.dim)).to(dtype)
        if self._cache_ok:
            self._cache[key] = p
        return p

    def __call__(self, g: Tensor, offset: int = 0) -> Tensor:
        out = torch.zeros(g.shape[0], self.dim, dtype=g.dtype, device=g.device)
        end = offset + g.shape[1]
        b = offset // self.block
        while b * self.block < end:
            lo, hi = max(offset, b * self.block), min(end, (b + 1) * self.block)
            pb = self._block(b, g.dtype)[lo - b * self.block : hi - b * self.block]
            out.addmm_(g[:, lo - offset : hi - offset], pb.to(g.device))
            b += 1
        return out


def _count_sketch_tables(n: int, dim: int, *keys: int) -> tuple[Tensor, Tensor]:
    g = generator(*keys)
    buckets = torch.randint(0, dim, (n,), generator=g)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return buckets, signs


class CountSketch(FlatProjector):
    """Sparse JL: each gradient coordinate goes to one of ``k`` buckets with a random sign."""

    def __init__(self, n_params: int, dim: int, seed: int) -> None:
        self.dim = dim
        self.buckets, self.signs = _count_sketch_tables(n_params, dim, seed, _KEY_COUNT)

    def __call__(self, g: Tensor, offset: int = 0) -> Tensor:
        end = offset + g.shape[1]
        out = torch.zeros(g.shape[0], self.dim, dtype=g.dtype, device=g.device)
        signs = self.signs[offset:end].to(device=g.device, dtype=g.dtype)
        out.index_add_(1, self.buckets[offset:end].to(g.device), g * signs)
        return out


class TensorSketch:
    """Sketch of per-example outer products ``sum_l D_l (x) A_l`` for one layer.

    ``TS(d (x) a) = irfft(rfft(CS_1(d)) * rfft(CS_2(a)))`` with independent count
    sketches CS_1, CS_2 of size k (Pham & Pagh 2013). Cost ``O(B L (o + i + k log k))``
    instead of ``O(B o i k)`` for a dense projection of the gradient.
    """

    def __init__(self, d_out: int, d_in: int, dim: int, seed: int, layer: int) -> None:
        self.dim = dim
        self.b_out, self.s_out = _count_sketch_tables(d_out, dim, seed, _KEY_TENSOR, layer, 0)
        self.b_in, self.s_in = _count_sketch_tables(d_in, dim, seed, _KEY_TENSOR, layer, 1)

    def _cs(self, x: Tensor, buckets: Tensor, signs: Tensor) -> Tensor:
        out = torch.zeros(*x.shape[:-1], self.dim, dtype=x.dtype, device=x.device)
        signs = signs.to(device=x.device, dtype=x.dtype)
        out.index_add_(x.ndim - 1, buckets.to(x.device), x * signs)
        return out

    def __call__(self, d: Tensor, a: Tensor) -> Tensor:
        """``d (B, L, o)``, ``a (B, L, i)`` -> ``(B, k)``."""
        fd = torch.fft.rfft(self._cs(d, self.b_out, self.s_out), dim=-1)
        fa = torch.fft.rfft(self._cs(a, self.b_in, self.s_in), dim=-1)
        return torch.fft.irfft((fd * fa).sum(1), n=self.dim, dim=-1)
