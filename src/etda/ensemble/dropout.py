"""Dropout ensembles: members are one trained model under different, seeded dropout masks.

* ``mode="fixed"``: each member is one fixed sub-network: one mask over a layer's units,
  the same for every train and test example;
* ``mode="per-example"``: masks differ per example and are a pure function of
  (seed, member, layer, example index, unit), so they are identical across runs, batch
  sizes and chunkings;
* ``forward_only=True`` (TRAK): gradients come from the unmasked model once; masked
  members only enter the forward-only Q term, averaged over members.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import copy

import numpy as np
import torch
from torch import Tensor, nn

from etda.ensemble.base import (
    BuildContext,
    Ensemble,
    Member,
    check_members,
    member_seed,
    prepared_copy,
)
from etda.seeding import uniform

MODES = ("fixed", "per-example")


def replace(ensemble: Dropout, **changes: object) -> Dropout:
    """A copy of ``ensemble`` with some attributes changed."""
    out = copy(ensemble)
    out.__dict__.update(changes)
    return out


class MaskedDropout(nn.Module):
    """Inverted dropout with a deterministic mask (a buffer ``mask``)."""

    def __init__(self, p: float, mode: str, seed: int, layer: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p, self.mode, self.seed, self.layer = p, mode, seed, layer
        self.per_example = mode == "per-example"
        self.register_buffer("mask", None, persistent=False)
        self.index: Tensor | None = None

    def set_index(self, index: Tensor) -> None:
        """Positions ``(B,)`` of the next batch's examples (per-example masks)."""
        self.index = index
        if self.per_example:
            self.mask = None

    def _make(self, x: Tensor) -> Tensor:
        units = int(np.prod(x.shape[1:]))
        if self.per_example:
            if self.index is None or len(self.index) != x.shape[0]:
                raise RuntimeError("per-example dropout needs example indices: call set_index")
            idx = self.index.numpy().astype(np.int64)[:, None]
            u = uniform(self.seed, self.layer, idx, np.arange(units)[None, :])
            shape = x.shape
        else:
            u = uniform(self.seed, self.layer, -1, np.arange(units))
            shape = x.shape[1:]
        keep = torch.from_numpy(u >= self.p).reshape(shape)
        return keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if self.mask is None:
            self.mask = self._make(x)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}, seed={self.seed}, layer={self.layer}"


def install_masks(model: nn.Module, p: float | None, mode: str, seed: int) -> int:
    """Replace every ``nn.Dropout`` of ``model`` (in place) by a seeded MaskedDropout.

    Returns the number of dropout layers replaced. ``p`` overrides each layer's rate.
    """
    count = 0
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout) and not isinstance(child, MaskedDropout):
                rate = child.p if p is None else p
                setattr(module, child_name, MaskedDropout(rate, mode, seed, count))
                count += 1
    return count


class Dropout(Ensemble):
    """``members`` masked copies of each given model (K given models: a K x M hybrid).

    ``p`` overrides the model's dropout rates (needed for models trained without
    dropout: their nn.Dropout layers have p=0). ``forward_only`` is for TRAK: one
    featurization of the unmasked model, masks only in the Q term.
    """

    name = "dropout"
    presets = {
        "dropout": (
            "fixed dropout sub-networks: one seeded mask per member, shared by all examples",
            "dropout",
            {"mode": "fixed", "forward_only": False},
        ),
        "dropout-per-example": (
            "MC dropout: seeded masks per member and per example",
            "dropout/ex",
            {"mode": "per-example", "forward_only": False},
        ),
        "dropout-forward": (
            "TRAK only: gradients of the unmasked model, masks only in the Q term",
            "dropout-fwd",
            {"forward_only": True},
        ),
    }
    OVERRIDE_P = 0.1  # the rate for models trained without dropout (for_model(adapt=True))

    def __init__(
        self,
        members: int = 10,
        mode: str = "fixed",
        p: float | None = None,
        forward_only: bool = False,
        seed: int | None = None,
    ) -> None:
        check_members(members)
        if mode not in MODES:
            raise ValueError(f"dropout mode must be one of {MODES}, got {mode!r}")
        if p is not None and not (isinstance(p, int | float) and 0.0 <= p < 1.0):
            raise ValueError(f"dropout rate must be in [0, 1), got {p!r}")
        self.n_members, self.mode, self.p = members, mode, p
        self.forward_only, self.seed = forward_only, seed

    def size(self, n_models: int) -> int:
        return n_models * self.n_members

    @property
    def varies_features(self) -> bool:
        return not self.forward_only

    def key_parts(self) -> list[str]:
        return [f"p{self.p:g}"] if self.p is not None else []

    def for_model(self, model: nn.Module, adapt: bool = False) -> tuple[Ensemble, str]:
        rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
        if not rates:
            raise ValueError(
                f"the model ({type(model).__name__}) has no dropout layers to mask (nn.Dropout); "
                "add nn.Dropout(p=0.0) modules where masks should go, or choose another "
                "ensemble, e.g. 'lora' or 'projection-seeds'"
            )
        if adapt and max(rates) == 0.0 and self.p is None:
            return (
                replace(self, p=self.OVERRIDE_P),
                f"trained without dropout: masks use p={self.OVERRIDE_P}",
            )
        return self, ""

    def _masked(self, model: nn.Module, ctx: BuildContext, seed: int) -> nn.Module:
        m = prepared_copy(model, ctx.dtype)
        n = install_masks(m, self.p, self.mode, seed)
        if n == 0:
            raise ValueError(
                "Dropout ensemble: the model has no nn.Dropout layers. Add nn.Dropout(p=0.0) "
                "modules where masks should go (e.g. after each hidden activation) and pass p=..."
            )
        rates = [mod.p for mod in m.modules() if isinstance(mod, MaskedDropout)]
        if max(rates) == 0.0:
            raise ValueError(
                "Dropout ensemble: the model's dropout rate is 0 (trained without dropout); "
                "pass a rate override, e.g. etda.Dropout(members=10, p=0.1) (CLI: --p 0.1)"
            )
        return m

    def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
        seed = ctx.seed if self.seed is None else self.seed
        for k, model in enumerate(models):
            base = prepared_copy(model, ctx.dtype) if self.forward_only else None
            for j in range(self.n_members):
                s = member_seed(seed, k, j)
                masked = self._masked(model, ctx, s)
                if self.forward_only:
                    yield Member(
                        base,
                        member_seed(seed, k, 0),
                        f"model{k}-mask{j}",
                        feature_key=f"model{k}-unmasked",
                        q_model=masked,
                        model_index=k,
                        info={"mask_seed": s},
                    )
                else:
                    yield Member(
                        masked, s, f"model{k}-mask{j}", model_index=k, info={"mask_seed": s}
                    )
