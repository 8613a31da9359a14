"""TracIn: ``tau_i(z) = sum_t eta_t grad L(z; theta_t) . grad L(z_i; theta_t)``.

A member expands into one sub-member per checkpoint ``theta_t`` (its weights replaced by the
checkpoint's), weighted by the learning rate ``eta_t``; each is scored as Grad-Dot and the
engine sums them with their weights.
"""

from __future__ import annotations

from etda.methods.base import Checkpoint
from etda.methods.graddot import GradDot


class TracIn(GradDot):
    name = "tracin"
    title = "TracIn"
    description = "Grad-Dot summed over training checkpoints, weighted by learning rate"
    needs = frozenset({"checkpoints"})

    def expand(self, checkpoints: list[Checkpoint] | None) -> list[tuple[dict | None, float]]:
        if not checkpoints:
            raise ValueError(
                "method 'tracin' needs checkpoints=[...] (and checkpoint_lrs), or an ensemble "
                "that provides them (e.g. etda.LoRA)"
            )
        return [(state, float(lr)) for state, lr in checkpoints]
