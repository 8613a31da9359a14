"""Per-example gradients from one batched forward/backward.

For a Linear or Conv2d layer, the per-example weight gradient is a sum of outer
products ``W_i = sum_l D_il (x) A_il`` of the layer's output gradients ``D`` and (unfolded)
inputs ``A``; module hooks give both for a whole chunk with one backward pass, so
per-example gradients of these layers never need vmap. Parameters outside such layers
(norms, embeddings, ...) fall back to ``torch.func.vmap(grad)``.

The per-example decomposition is exact when examples do not interact inside the model,
which holds for any model in eval mode (BatchNorm uses running statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from etda.batch import run_model, take, unsqueeze0
from etda.task import Target, Task, scalar


@dataclass
class Layer:
    """A Linear/Conv2d layer with attributed weight and/or bias."""

    name: str
    module: nn.Module
    weight: str | None  # full parameter name, if attributed
    bias: str | None
    d_out: int
    d_in: int  # including the bias column when the bias is attributed

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in


def is_hf_conv1d(module: nn.Module) -> bool:
    """HuggingFace's ``Conv1D`` (GPT-2): a Linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return (
        isinstance(module, nn.Conv2d | nn.Conv1d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def find_layers(model: nn.Module, params: list[str]) -> tuple[list[Layer], list[str]]:
    """Split attributed ``params`` into hookable layers and the rest (vmap fallback)."""
    chosen = set(params)
    layers: list[Layer] = []
    covered: set[str] = set()
    for mname, module in model.named_modules():
        if not _supported(module):
            continue
        prefix = f"{mname}." if mname else ""
        w = prefix + "weight" if prefix + "weight" in chosen else None
        b = prefix + "bias" if module.bias is not None and prefix + "bias" in chosen else None
        if w is None and b is None:
            continue
        if is_hf_conv1d(module):  # weight (in, out)
            d_out, d_w = module.weight.shape[1], module.weight.shape[0]
        else:
            d_out, d_w = module.weight.shape[0], module.weight[0].numel()
        d_in = (d_w if w else 0) + (1 if b else 0)
        layers.append(Layer(mname, module, w, b, d_out, d_in))
        covered.update(n for n in (w, b) if n)
    rest = [p for p in params if p not in covered]
    return layers, rest


@dataclass
class Captured:
    """One chunk's per-example gradient pieces.

    ``factors[j] = (D (B, L, o), A (B, L, i))`` for each hooked layer; ``rest`` maps the
    remaining parameter names to per-example gradients ``(B, *shape)``; ``out`` holds the
    model outputs (for f and Q).
    """

    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    rest: dict[str, Tensor] = field(default_factory=dict)
    out: Tensor | None = None


def _as_rows(module: nn.Module, inp: Tensor, out_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and output gradients of one call as ``A (B, L, i)`` and ``D (B, L, o)``."""
    b = inp.shape[0]
    if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
        a = nn.functional.unfold(
            inp.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        ).transpose(1, 2)
        d = out_grad.transpose(1, 2)
    elif isinstance(module, nn.Conv2d):
        a = nn.functional.unfold(
            inp,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        ).transpose(1, 2)
        d = out_grad.reshape(b, out_grad.shape[1], -1).transpose(1, 2)
    else:
        a = inp.reshape(b, -1, inp.shape[-1])
        d = out_grad.reshape(b, -1, out_grad.shape[-1])
    return d, a


def set_example_index(model: nn.Module, index: Tensor) -> None:
    """Tell every module that draws per-example randomness (a ``set_index`` method, e.g.
    per-example dropout masks) the dataset positions ``(B,)`` of the next batch."""
    for m in model.modules():
        if hasattr(m, "set_index"):
            m.set_index(index)


def mask_in_dims(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, int | None]]:
    """Buffers for functional calls and their vmap dims (per-example dropout masks: 0)."""
    buffers = dict(model.named_buffers())
    dims: dict[str, int | None] = {n: None for n in buffers}
    for mname, module in model.named_modules():
        if getattr(module, "per_example", False):
            dims[f"{mname}.mask" if mname else "mask"] = 0
    return buffers, dims


def capture(
    model: nn.Module,
    task: Task,
    target: Target,
    x: Tensor,
    y: Tensor,
    layers: list[Layer],
    rest: list[str],
) -> Captured:
    """Per-example gradient pieces of ``etda.task.scalar(task, target)`` for a chunk
    ``x (B, ...)``."""
    records: dict[int, list[tuple[Tensor, Tensor]]] = {j: [] for j in range(len(layers))}
    handles = []
    for j, layer in enumerate(layers):

        def hook(mod: nn.Module, inputs: tuple, output: Tensor, j: int = j) -> Tensor:
            records[j].append((inputs[0].detach(), output))
            # Downstream gets a copy, so an in-place op (ReLU(inplace=True)) cannot
            # overwrite the tensor whose gradient we take.
            return output.clone()

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = run_model(model, x, task)
            task.check(out, y)
            result = Captured(out=out.detach())
            if layers:
                outputs = [o for j in records for _, o in records[j]]
                if any(not o.requires_grad for o in outputs):
                    raise RuntimeError("a hooked layer's output does not require grad")
                s = scalar(task, target, out, y).sum()
                grads = torch.autograd.grad(s, outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    gi = 0
    for j, layer in enumerate(layers):
        ds, as_ = [], []
        for inp, o in records[j]:
            g = grads[gi] if grads[gi] is not None else torch.zeros_like(o)
            gi += 1
            d, a = _as_rows(layer.module, inp, g)
            ones = a.new_ones(*a.shape[:-1], 1)
            if layer.weight is None:
                a = a[..., :0]
            if layer.bias is not None:
                a = torch.cat([a, ones], dim=-1)
            ds.append(d)
            as_.append(a)
        result.factors.append((torch.cat(ds, 1), torch.cat(as_, 1)))
    if rest:
        result.rest = vmap_grads(model, task, target, x, y, rest)
    return result


def vmap_grads(
    model: nn.Module, task: Task, target: Target, x: Tensor, y: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """Per-example gradients ``{name: (B, *shape)}`` by ``vmap(grad)`` (the general path)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    wrt = {n: params[n] for n in names}
    buffers, buf_dims = mask_in_dims(model)
    call = TaskForward(model, task)  # the task's forward, with parameters swapped in

    def one(p: dict[str, Tensor], bufs: dict[str, Tensor], xi: Any, yi: Tensor) -> Tensor:
        out = functional_call(call, (prefixed({**params, **p}), prefixed(bufs)), (unsqueeze0(xi),))
        return scalar(task, target, out, yi.unsqueeze(0)).squeeze(0)

    try:
        return vmap(grad(one), in_dims=(None, buf_dims, 0, 0))(wrt, buffers, x, y)
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        # The forward has data-dependent control flow (e.g. HuggingFace attention masks):
        # one backward pass per example instead, exact and general, slower.
        return loop_grads(model, task, target, x, y, names)


def loop_grads(
    model: nn.Module, task: Task, target: Target, x: Any, y: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """Per-example gradients ``{name: (B, *shape)}`` by one backward pass per example."""
    params = dict(model.named_parameters())
    wrt = [params[n] for n in names]
    rows: list[list[Tensor]] = []
    with torch.enable_grad():
        for i in range(y.shape[0]):
            out = run_model(model, take(x, i, i + 1), task)
            s = scalar(task, target, out, y[i : i + 1]).sum()
            gs = torch.autograd.grad(s, wrt, allow_unused=True)
            rows.append(
                [torch.zeros_like(p) if g is None else g for g, p in zip(gs, wrt, strict=True)]
            )
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


class TaskForward(nn.Module):
    """``run_model(model, x, task)`` as a module, so that ``functional_call`` can swap the
    model's parameters (named ``model.<name>``) under any task's forward and input type."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: Any) -> Tensor:
        return run_model(self.model, x, self.task)


def prefixed(d: dict) -> dict:
    return {f"model.{k}": v for k, v in d.items()}


def flat_gradient(
    cap: Captured, layers: list[Layer], params: list[str], shapes: dict[str, torch.Size]
) -> Tensor:
    """Assemble per-example gradients ``(B, p)`` flattened in the order of ``params``."""
    b = cap.out.shape[0]
    sizes = [shapes[n].numel() for n in params]
    offsets = dict(zip(params, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    dtype = cap.out.dtype
    flat = torch.empty(b, sum(sizes), dtype=dtype, device=cap.out.device)
    for layer, (d, a) in zip(layers, cap.factors, strict=True):
        w = torch.bmm(d.transpose(1, 2), a)  # (B, o, i)
        if layer.weight is not None:
            n_w = shapes[layer.weight].numel()
            o = offsets[layer.weight]
            wg = w[:, :, : n_w // layer.d_out]
            if is_hf_conv1d(layer.module):  # stored (in, out)
                wg = wg.transpose(1, 2)
            flat[:, o : o + n_w] = wg.reshape(b, -1)
        if layer.bias is not None:
            o = offsets[layer.bias]
            flat[:, o : o + layer.d_out] = w[:, :, -1]
    for n, g in cap.rest.items():
        o = offsets[n]
        flat[:, o : o + g[0].numel()] = g.reshape(b, -1)
    return flat
