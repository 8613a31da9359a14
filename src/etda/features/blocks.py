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
) -> Tensor:
    """Gradient inner products ``<g(a_r), g(b_c)>`` of shape ``(len(rows), len(cols))``."""
    out: Tensor | None = None

    def add(t: Tensor) -> None:
        nonlocal out
        out = t if out is None else out.add_(t)

    for name in EXPLICIT:
        if name in a:
            xa = torch.as_tensor(a[name][rows]).to(dtype)
            xb = torch.as_tensor(b[name][cols]).to(dtype)
            add(xa @ xb.T)
    for j in factor_ids(a):
        da = torch.as_tensor(a[f"d{j}"][rows]).to(dtype)
        db = torch.as_tensor(b[f"d{j}"][cols]).to(dtype)
        aa = torch.as_tensor(a[f"a{j}"][rows]).to(dtype)
        ab = torch.as_tensor(b[f"a{j}"][cols]).to(dtype)
        add((da @ db.T).mul_(_gram(aa, ab)))
    if out is None:
        raise ValueError("no feature blocks to take inner products of")
    return out


# Input Gram matrices repeat across members: every member sees the same first-layer
# inputs (the data), so A A^T of that layer is computed once per run, not once per member.
_GRAM_CACHE: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
_GRAM_CACHE_BYTES = 512 * 1024**2
_GRAM_CACHE_MIN_WIDTH = 256  # below this the product is cheaper than hashing


def _digest(t: Tensor) -> str:
    h = hashlib.blake2b(str((tuple(t.shape), t.dtype)).encode(), digest_size=16)
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """``x y^T``, memoized by content for wide inputs (returns a tensor not to be mutated)."""
    if x.shape[1] < _GRAM_CACHE_MIN_WIDTH:
        return x @ y.T
    key = (_digest(x), _digest(y))
    if key in _GRAM_CACHE:
        _GRAM_CACHE.move_to_end(key)
        return _GRAM_CACHE[key]
    out = x @ y.T
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
