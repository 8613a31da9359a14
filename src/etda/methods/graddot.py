"""Grad-Dot: ``tau_i(z) = grad L(z) . grad L(z_i)``."""

from __future__ import annotations

from etda.features.blocks import Features, TrainFeatures
from etda.methods.base import Diagonal, MemberContext, MemberFactors, Method


class GradDot(Method):
    name = "graddot"
    title = "Grad-Dot"
    description = "dot product of the loss gradients"
    target = "loss"

    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        if train.explicit_width is not None:
            return MemberFactors(test.rows(0, test.n), "feature")
        return MemberFactors(train.inner(test), "sample")  # exact factors: the kernel itself

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal:
        return Diagonal(train.sq_norms())
