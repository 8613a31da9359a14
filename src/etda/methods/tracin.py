"""TracIn: ``tau_i(z) = sum_t eta_t grad L(z; theta_t) . grad L(z_i; theta_t)``.

The engine featurizes each member at every checkpoint ``theta_t`` and sums the per-
checkpoint Grad-Dot scores with the learning-rate weights ``eta_t``.
"""

from __future__ import annotations

from etda.methods.base import Method
from etda.methods.graddot import GradDot


class TracIn(GradDot):
    name = "tracin"
    uses_checkpoints = True

    factors = Method.factors  # checkpoints: no out-of-core form
