"""Model inputs as etda moves them: one tensor ``(N, ...)`` or a dict of tensors that share
their first dimension (``{"input_ids": (N, T), "attention_mask": (N, T)}``), plus the one
adapter that runs a model on them and reads its output.

Every place that slices, casts, moves or hashes inputs goes through these functions, so a
model whose forward takes keyword tensors (``model(**batch)``) works wherever a tensor
model does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


class LazyInputs:
    """Inputs that are read on demand, a range of examples at a time, and never held whole
    (``etda.sources.StreamedInputs`` over a Dataset or a DataLoader). ``take`` returns a
    tensor or a dict of tensors; ``digest`` is a content hash made on the first pass."""

    n: int
    digest: str
    keys: tuple[str, ...] | None  # the dict keys of every chunk; None: tensor chunks

    def take(self, lo: int, hi: int) -> Tensor | Mapping[str, Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n


Inputs = Tensor | Mapping[str, Tensor] | LazyInputs


def is_lazy(x: Inputs) -> bool:
    return isinstance(x, LazyInputs)


def is_dict(x: Inputs) -> bool:
    return x.keys is not None if isinstance(x, LazyInputs) else isinstance(x, Mapping)


def leaves(x: Inputs) -> list[Tensor]:
    """The tensors of ``x`` (a dict's in key order)."""
    if isinstance(x, LazyInputs):
        raise TypeError("streamed inputs have no tensors until read: use batch.take")
    return [x[k] for k in sorted(x)] if is_dict(x) else [x]


def n_rows(x: Inputs) -> int:
    """Number of examples (the shared first dimension)."""
    if isinstance(x, LazyInputs):
        return x.n
    return int(leaves(x)[0].shape[0])


def apply(x: Inputs, fn: Any) -> Inputs:
    """``fn`` on every tensor of ``x``, keeping its structure (streamed inputs are read whole
    first: call it on ``take``'s result instead where a range will do)."""
    x = materialize(x)
    return {k: fn(v) for k, v in x.items()} if is_dict(x) else fn(x)


def take(x: Inputs, lo: int, hi: int) -> Inputs:
    """Examples ``[lo, hi)``."""
    if isinstance(x, LazyInputs):
        return x.take(lo, hi)
    return apply(x, lambda t: t[lo:hi])


def materialize(x: Inputs) -> Tensor | Mapping[str, Tensor]:
    """All examples in memory (streamed inputs are read whole; others returned as they are).
    Only for steps that need every example at once (LoRA training, exact-Hessian IF)."""
    return x.take(0, x.n) if isinstance(x, LazyInputs) else x


def select(x: Inputs, index: Tensor) -> Inputs:
    """Examples at ``index``."""
    return apply(x, lambda t: t[index])


def cast(x: Inputs, dtype: torch.dtype, device: torch.device | str | None = None) -> Inputs:
    """Floating tensors follow the model's ``dtype``; integer ones (tokens, masks) keep
    theirs; all move to ``device`` when given."""

    def one(t: Tensor) -> Tensor:
        t = t.to(dtype) if t.is_floating_point() else t
        return t if device is None else t.to(device, non_blocking=True)

    return apply(x, one)


def unsqueeze0(x: Inputs) -> Inputs:
    return apply(x, lambda t: t.unsqueeze(0))


def describe(x: Inputs) -> str:
    """Shapes for error messages: ``(784,)`` or ``{input_ids: (128,), ...}``."""
    if isinstance(x, LazyInputs):
        return describe(x.take(0, 1))
    if is_dict(x):
        return "{" + ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in x.items()) + "}"
    return str(tuple(x.shape[1:]))


def unwrap(out: Any) -> Tensor:
    """The tensor a task reads from a model's output: the output itself, a HuggingFace
    ``ModelOutput``'s ``logits``, or the first element of a tuple or list."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"cannot read the model's output of type {type(out).__name__}: return a tensor, a tuple "
        "whose first element is one, or an object with .logits; or give a task whose "
        "forward(model, x) returns a tensor"
    )


def run_model(model: nn.Module, x: Inputs, task: Any = None) -> Tensor:
    """The model's output tensor on inputs ``x``: ``task.forward(model, x)`` when the task
    defines it, else ``model(**x)`` for a dict and ``model(x)`` for a tensor."""
    forward = getattr(task, "forward", None)
    if forward is not None:
        return unwrap(forward(model, x))
    return unwrap(model(**x) if is_dict(x) else model(x))
