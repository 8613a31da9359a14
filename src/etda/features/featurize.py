"""Featurizers: per-example gradients of one member -> feature blocks, chunk by chunk.

One featurizer is chosen per run by its projection name:

========== ==============================================================================
``none``    exact gradients: Linear-layer factors (kernel by two Gram matrices) plus flat
            gradients for other layers; no projection error (sample-space methods)
``identity`` flattened exact per-example gradients ``(n, p)`` (tests, tiny models)
``gaussian`` / ``rademacher`` dense JL projection of the flattened gradient (reference)
``sparse``  count sketch (sparse JL) of the flattened gradient
``factored`` TensorSketch of each layer's outer products (fastest); count sketch of the rest
========== ==============================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from etda import batch
from etda.features.capture import Captured, Layer, capture, find_layers, flat_gradient
from etda.features.curvature import Preconditioner
from etda.features.projectors import (
    CountSketch,
    DenseProjector,
    FlatProjector,
    Identity,
    TensorSketch,
)
from etda.task import Target, Task, q_weights

PROJECTIONS = ("none", "identity", "gaussian", "rademacher", "sparse", "factored")


class NonFiniteError(ValueError):
    """Raised when an input, output or gradient is NaN or infinite."""


@dataclass(frozen=True)
class FeatureSpec:
    """How a member's gradients become features (recorded with every store and score)."""

    projection: str = "factored"
    dim: int = 2048
    seed: int = 0
    target: str = "output"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; choose from {PROJECTIONS}")
        if self.projection not in ("none", "identity") and self.dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer, got {self.dim}")
        if self.target not in ("loss", "output"):
            raise ValueError(f"target must be 'loss' or 'output', got {self.target!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


class Featurizer:
    """Turns chunks ``(x, y, index)`` into feature blocks ``{name: (B, width)}``.

    ``use_hooks=False`` forces the general ``vmap(grad)`` path for every parameter
    (a reference for tests).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        params: list[str],
        spec: FeatureSpec,
        probe: tuple[Tensor, Tensor],
        use_hooks: bool = True,
        curvature: Preconditioner | None = None,
    ) -> None:
        self.model, self.task, self.params, self.spec = model, task, params, spec
        self.curvature = curvature
        named = dict(model.named_parameters())
        self.shapes = {n: named[n].shape for n in params}
        self.n_params = sum(s.numel() for s in self.shapes.values())
        self.layers, self.rest = find_layers(model, params) if use_hooks else ([], list(params))
        self.target: Target = spec.target  # type: ignore[assignment]
        positions = self._positions(*probe) if self.layers else []
        # Layers whose per-example gradient is one outer product keep exact factors
        # under projection "none"; multi-position layers are flattened.
        # A curvature makes every layer's gradient dense (preconditioned elementwise in its
        # Kronecker eigenbasis): no layer keeps factors, every one is formed and flattened.
        one = curvature is None
        self.factored = [j for j, L in enumerate(positions) if L == 1 and one]
        self.multi = [j for j, L in enumerate(positions) if L != 1 or not one]
        self.flat_proj: FlatProjector | None = None
        self.sketches: list[TensorSketch | CountSketch] = []
        p = spec.projection
        if p == "identity":
            self.flat_proj = Identity(self.n_params)
        elif p in ("gaussian", "rademacher"):
            self.flat_proj = DenseProjector(self.n_params, spec.dim, spec.seed, kind=p)
        elif p == "sparse":
            self.flat_proj = CountSketch(self.n_params, spec.dim, spec.seed)
        elif p == "factored":
            for j, layer in enumerate(self.layers):
                L = positions[j]
                if curvature is None and L * (layer.d_out + layer.d_in) <= layer.n_params:
                    self.sketches.append(
                        TensorSketch(layer.d_out, layer.d_in, spec.dim, spec.seed, j)
                    )
                else:  # cheaper to form this layer's gradient and count-sketch it
                    self.sketches.append(
                        CountSketch(layer.n_params, spec.dim, spec.seed + 7919 * (j + 1))
                    )
            n_rest = sum(self.shapes[n].numel() for n in self.rest)
            self.rest_proj = CountSketch(n_rest, spec.dim, spec.seed + 104729) if n_rest else None

    def _positions(self, x: Tensor, y: Tensor) -> list[int]:
        for m in self.model.modules():  # per-example masks need an index, even for a probe
            if hasattr(m, "set_index"):
                m.set_index(torch.arange(1))
        p = next(self.model.parameters())
        x = batch.cast(batch.take(x, 0, 1), p.dtype, p.device)
        cap = capture(self.model, self.task, self.target, x, y[:1].to(p.device), self.layers, [])
        return [d.shape[1] for d, _ in cap.factors]

    def widths(self) -> dict[str, int]:
        """Names and widths of the blocks this featurizer writes."""
        p = self.spec.projection
        out: dict[str, int] = {}
        if p == "none":
            for j in self.factored:
                out[f"d{j}"] = self.layers[j].d_out
                out[f"a{j}"] = self.layers[j].d_in
            flat = sum(self.layers[j].n_params for j in self.multi) + sum(
                self.shapes[n].numel() for n in self.rest
            )
            if flat:
                out["g"] = flat
        elif p == "identity":
            out["g"] = self.n_params
        else:
            out["phi"] = self.spec.dim
        out["f"] = 1
        out["q"] = 1
        return out

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        cap = capture(self.model, self.task, self.target, x, y, self.layers, self.rest)
        blocks = self._blocks(cap)
        blocks["f"] = self.task.output(cap.out, y).unsqueeze(1)
        blocks["q"] = q_weights(self.task, cap.out, y).unsqueeze(1)
        return blocks

    def _blocks(self, cap: Captured) -> dict[str, Tensor]:
        p = self.spec.projection
        b = cap.out.shape[0]
        if self.flat_proj is not None:
            flat = (
                torch.cat(self._dense_parts(cap), 1)
                if self.curvature is not None
                else flat_gradient(cap, self.layers, self.params, self.shapes)
            )
            return {"g" if p == "identity" else "phi": self.flat_proj(flat)}
        if p == "none":
            out = {}
            for j in self.factored:
                d, a = cap.factors[j]
                out[f"d{j}"], out[f"a{j}"] = d[:, 0], a[:, 0]
            parts = self._dense_parts(cap, self.multi)
            if parts:
                out["g"] = torch.cat(parts, 1)
            return out
        phi = torch.zeros(b, self.spec.dim, dtype=cap.out.dtype, device=cap.out.device)
        for j, ((d, a), sk) in enumerate(zip(cap.factors, self.sketches, strict=True)):
            if isinstance(sk, TensorSketch):
                phi += sk(d, a)
            else:
                phi += sk(self._layer(j, d, a))
        if self.rest:
            phi += self.rest_proj(torch.cat(self._dense_parts(cap, []), 1))
        return {"phi": phi}

    def _layer(self, j: int, d: Tensor, a: Tensor) -> Tensor:
        """Layer ``j``'s per-example gradient ``(B, o * i)`` (preconditioned with a curvature)."""
        if self.curvature is not None:
            return self.curvature.layer_features(j, d, a)
        return _outer(d, a).reshape(d.shape[0], -1)

    def _dense_parts(self, cap: Captured, layers: list[int] | None = None) -> list[Tensor]:
        """Flattened gradients of ``layers`` (default: all) and of the other parameters."""
        js = range(len(self.layers)) if layers is None else layers
        parts = [self._layer(j, *cap.factors[j]) for j in js]
        for n in self.rest:
            g = cap.rest[n]
            c = self.curvature
            parts.append(c.rest_features(n, g) if c is not None else g.reshape(g.shape[0], -1))
        return parts


def _outer(d: Tensor, a: Tensor) -> Tensor:
    """Per-example gradient ``sum_l d_l (x) a_l``: ``(B, L, o), (B, L, i) -> (B, o, i)``."""
    return torch.bmm(d.transpose(1, 2), a)


def check_finite(blocks: dict[str, Tensor], index: Tensor, what: str) -> None:
    for name, t in blocks.items():
        bad = ~torch.isfinite(t).all(dim=1)
        if bool(bad.any()):
            where = index[bad][:10].tolist()
            raise NonFiniteError(
                f"non-finite {'gradient' if name not in ('f', 'q') else 'model output'} "
                f"for {what} example(s) at index {where} (block {name!r}): check the data, "
                "the model's weights and the loss for NaN/inf"
            )


__all__ = ["FeatureSpec", "Featurizer", "NonFiniteError", "PROJECTIONS", "Layer", "check_finite"]
