"""Feature blocks of one member on one dataset, and inner products between them.

A member's features on ``n`` examples are named 2-D arrays ``(n, width)``:

* ``phi`` or ``g``: explicit features (a sketch/projection, or exact flattened gradients);
* ``d{j}``/``a{j}``: exact factors of Linear layer ``j`` (output gradients and inputs with
  a bias column), whose per-example gradient is ``d (x) a``: their kernel is
  ``(D D'^T) * (A A'^T)`` without ever forming the gradients (projection ``"none"``);
* ``f``/``q``: the model output and TRAK's Q term, width 1 (not features).

Methods only ever see inner products, so they never know which featurizer ran.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

EXPLICIT = ("phi", "g")
EXTRA = ("f", "q")


def factor_ids(blocks: Mapping[str, Tensor]) -> list[str]:
    return sorted({k[1:] for k in blocks if k[0] == "d" and k[1:].isdigit()}, key=int)


def explicit_width(blocks: Mapping[str, Tensor]) -> int | None:
    """Feature dimension k if the features are one explicit matrix, else None."""
    if factor_ids(blocks):
        return None
    names = [k for k in EXPLICIT if k in blocks]
    return blocks[names[0]].shape[1] if len(names) == 1 else None


def matrix(blocks: Mapping[str, Tensor]) -> Tensor:
    names = [k for k in EXPLICIT if k in blocks]
    if factor_ids(blocks) or len(names) != 1:
        raise ValueError("features are not one explicit matrix")
    return torch.as_tensor(blocks[names[0]])


def inner(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    rows: slice = slice(None),
    cols: slice = slice(None),
    dtype: torch.dtype = torch.float64,
    compute: torch.dtype | None = None,
) -> Tensor:
    """Gradient inner products ``<g(a_r), g(b_c)>`` of shape ``(len(rows), len(cols))`` in
    ``dtype``. ``compute`` (default ``dtype``): the precision of the matrix products; each
    layer's product is then summed in ``dtype`` (mixed precision: float32 or bfloat16
    products, float64 sums)."""
    compute = compute or dtype
    if a is b and rows == cols and compute == torch.float32:
        return _symmetric_inner(a, rows, dtype)
    out: Tensor | None = None

    def add(t: Tensor) -> None:
        nonlocal out
        t = t.to(dtype)
        out = t if out is None else out.add_(t)

    for name in EXPLICIT:
        if name in a:
            xa = torch.as_tensor(a[name][rows]).to(compute)
            xb = torch.as_tensor(b[name][cols]).to(compute)
            add(xa @ xb.T)
    for j in factor_ids(a):
        da = torch.as_tensor(a[f"d{j}"][rows]).to(compute)
        db = torch.as_tensor(b[f"d{j}"][cols]).to(compute)
        aa = torch.as_tensor(a[f"a{j}"][rows]).to(compute)
        ab = torch.as_tensor(b[f"a{j}"][cols]).to(compute)
        dd = (da @ db.T).to(dtype) if compute == torch.bfloat16 else da @ db.T
        add(dd.mul_(_gram(aa, ab)))  # bf16: the product of the two Grams in ``dtype``
    if out is None:
        raise ValueError("no feature blocks to take inner products of")
    return out


def _symmetric_inner(a: Mapping[str, Tensor], rows: slice, dtype: torch.dtype) -> Tensor:
    """``<g(a_r), g(a_c)>`` ``(n, n)`` of one split with itself, float32 products: BLAS
    ``syrk`` computes each layer's Gram on its upper triangle only (half the products of a
    general matrix product, and faster still for narrow layers); the triangles are
    multiplied and summed in float32 (a few layer terms: no precision a float32 product
    keeps is lost), mirrored, and returned in ``dtype``."""
    out: Tensor | None = None

    def add(t: Tensor) -> None:
        nonlocal out
        out = t if out is None else out.add_(t)

    for name in EXPLICIT:
        if name in a:
            add(_syrk(torch.as_tensor(a[name][rows]).to(torch.float32)))
    for j in factor_ids(a):
        dd = _syrk(torch.as_tensor(a[f"d{j}"][rows]).to(torch.float32))
        aa = torch.as_tensor(a[f"a{j}"][rows]).to(torch.float32)
        add(dd.mul_(_gram(aa, aa, symmetric=True)))
    if out is None:
        raise ValueError("no feature blocks to take inner products of")
    return _mirror_upper(out).to(dtype)


def _mirror_upper(u: Tensor, block: int = 512) -> Tensor:
    """The symmetric matrix whose upper triangle is ``u``'s ``(n, n)``, in place, block by
    block (a cache-friendly transpose)."""
    n = u.shape[0]
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        diag = u[lo:hi, lo:hi]
        diag.copy_(diag.triu() + diag.triu(1).T)
        for lo2 in range(hi, n, block):
            hi2 = min(lo2 + block, n)
            u[lo2:hi2, lo:hi] = u[lo:hi, lo2:hi2].T
    return u.T if u.stride(0) == 1 else u  # symmetric: the row-major view of the same buffer


def blas_threads() -> AbstractContextManager:
    """A context in which SciPy's BLAS and LAPACK (the fast path's ``syrk``, ``spotrf`` and
    ``spotrs``) run on as many threads as torch does."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _syrk(x: Tensor) -> Tensor:
    """The upper triangle of ``x x^T`` ``(n, n)`` float32 (the strict lower triangle is zero),
    by BLAS ``ssyrk``."""
    from scipy.linalg import blas

    with blas_threads():
        upper = blas.ssyrk(1.0, x.detach().cpu().contiguous().numpy(), lower=0)
    return torch.from_numpy(upper)


# Input Gram matrices repeat across members: every member sees the same first-layer
# inputs (the data), so A A^T of that layer is computed once per run, not once per member.
_GRAM_CACHE: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
_GRAM_CACHE_BYTES = 512 * 1024**2
_GRAM_CACHE_MIN_WIDTH = 256  # below this the product is cheaper than hashing


def _digest(t: Tensor) -> str:
    h = hashlib.blake2b(str((tuple(t.shape), t.dtype)).encode(), digest_size=16)
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gram(x: Tensor, y: Tensor, symmetric: bool = False) -> Tensor:
    """``x y^T``, memoized by content for wide inputs (returns a tensor not to be mutated).
    ``symmetric`` (``y`` is ``x``, float32): only the upper triangle, by :func:`_syrk`."""
    product = (lambda: _syrk(x)) if symmetric else (lambda: x @ y.T)
    if x.shape[1] < _GRAM_CACHE_MIN_WIDTH:
        return product()
    key = (_digest(x), "upper" if symmetric else _digest(y))  # digests include the dtype
    if key in _GRAM_CACHE:
        _GRAM_CACHE.move_to_end(key)
        return _GRAM_CACHE[key]
    out = product()
    _GRAM_CACHE[key] = out
    while sum(t.numel() * t.element_size() for t in _GRAM_CACHE.values()) > _GRAM_CACHE_BYTES:
        _GRAM_CACHE.popitem(last=False)
    return out


def sq_norms(a: Mapping[str, Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Squared gradient norms ``(n,)``."""
    out = None
    for name in EXPLICIT:
        if name in a:
            t = torch.as_tensor(a[name]).to(dtype).pow(2).sum(1)
            out = t if out is None else out + t
    for j in factor_ids(a):
        t = torch.as_tensor(a[f"d{j}"]).to(dtype).pow(2).sum(1) * torch.as_tensor(a[f"a{j}"]).to(
            dtype
        ).pow(2).sum(1)
        out = t if out is None else out + t
    if out is None:
        raise ValueError("no feature blocks")
    return out


# ------------------------------------------------------------------- feature views


class Features:
    """One member's feature blocks on one split, in memory: ``{name: (n, width)}``.

    The view methods use: ``n``, ``explicit_width`` (k for one explicit matrix, else None),
    ``q`` (TRAK's Q, float64 ``(n,)``), ``ranges()`` (row blocks: here one, ``(0, n)``),
    ``rows(lo, hi)`` (explicit features, float64), ``gram()`` (``Phi^T Phi``), ``sq_norms()``
    and ``inner(other)`` (gradient inner products, ``(n_other, n)``, also for exact factors).
    :class:`StreamedFeatures` offers the same over a feature store, block by block, so a
    method's linear algebra is written once for both.
    """

    in_memory = True

    def __init__(
        self,
        blocks: Mapping[str, Tensor],
        precision: torch.dtype = torch.float64,
        solve_precision: torch.dtype = torch.float64,
    ) -> None:
        self.precision = precision  # of the Gram products (summed in float64)
        self.solve_precision = solve_precision  # of the damped factorization and solves
        self.blocks = dict(blocks)
        self.features = {k: v for k, v in self.blocks.items() if k not in EXTRA}
        self.n = next(iter(self.blocks.values())).shape[0]
        self.explicit_width = explicit_width(self.features)

    @property
    def q(self) -> Tensor | None:
        return torch.as_tensor(self.blocks["q"][:, 0]).double() if "q" in self.blocks else None

    def matrix(self) -> Tensor:
        """The explicit feature matrix ``(n, k)`` as stored (ValueError for exact factors)."""
        return matrix(self.features)

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, self.n)]

    def rows(self, lo: int, hi: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return self.matrix()[lo:hi].to(dtype)

    def gram(self) -> Tensor:
        phi = self.matrix().to(self.precision)
        return (phi.T @ phi).to(torch.float64)

    def sq_norms(self) -> Tensor:
        return sq_norms(self.features)

    def inner(self, other: Features, dtype: torch.dtype = torch.float64) -> Tensor:
        """``<g(other_r), g(self_c)>``: ``(other.n, self.n)`` in ``dtype`` (float64; the fast
        path's self-kernel float32)."""
        return inner(other.features, self.features, dtype=dtype, compute=self.precision)


class StreamedFeatures:
    """A member's stored training features, read ``block`` rows at a time (out of core).

    Offers what :class:`Features` does except ``inner`` (an ``n x n`` kernel is what out of
    core avoids). One streaming pass gives the Gram matrix, the squared norms and Q together.
    """

    in_memory = False

    def __init__(
        self, store: Any, block: int, solve_precision: torch.dtype = torch.float64
    ) -> None:
        keys = [k for k in EXPLICIT if k in store.widths]
        if len(keys) != 1 or any(k[0] in "da" and k[1:].isdigit() for k in store.widths):
            raise ValueError(
                "out-of-core scoring needs explicit (projected) features; the exact kernel "
                "(projection 'none') is n x n: pass proj_dim=... (CLI --proj-dim) or a larger "
                "memory budget"
            )
        self.store, self.block, self.key = store, block, keys[0]
        self.solve_precision = solve_precision  # of the damped factorization and solves
        self.n = store.n
        self.explicit_width = store.widths[self.key]
        self._gram: Tensor | None = None
        self._norms: Tensor | None = None
        self._q: Tensor | None = None

    def ranges(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.block, self.n)) for lo in range(0, self.n, self.block)]

    precision = torch.float64

    def rows(self, lo: int, hi: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return self.store.rows(lo, hi, [self.key])[self.key].to(dtype)

    def _stream(self, gram: bool) -> None:
        k = self.explicit_width
        g = torch.zeros(k, k, dtype=torch.float64) if gram else None
        norms = torch.empty(self.n, dtype=torch.float64)
        has_q = "q" in self.store.widths
        q = torch.empty(self.n, dtype=torch.float64) if has_q else None
        for lo, hi in self.ranges():
            rows = self.store.rows(lo, hi, [self.key] + (["q"] if has_q else []))
            phi = rows[self.key].to(torch.float64)
            if g is not None:
                g.addmm_(phi.T, phi)
            norms[lo:hi] = (phi * phi).sum(1)
            if q is not None:
                q[lo:hi] = rows["q"][:, 0].to(torch.float64)
        self._gram = g if g is not None else self._gram
        self._norms, self._q = norms, q

    def gram(self) -> Tensor:
        if self._gram is None:
            self._stream(gram=True)
        return self._gram  # type: ignore[return-value]

    def sq_norms(self) -> Tensor:
        if self._norms is None:
            self._stream(gram=False)
        return self._norms  # type: ignore[return-value]

    @property
    def q(self) -> Tensor | None:
        if self._norms is None:
            self._stream(gram=False)
        return self._q

    def matrix(self) -> Tensor:
        raise ValueError("the features are on disk (out of core): read them with rows(lo, hi)")

    def inner(self, other: Features, dtype: torch.dtype = torch.float64) -> Tensor:
        raise ValueError(
            "an n x n kernel is not formed out of core; the method needs a feature-space form"
        )


TrainFeatures = Features | StreamedFeatures
