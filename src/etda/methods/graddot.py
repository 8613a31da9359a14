"""Grad-Dot: ``tau_i(z) = grad L(z) . grad L(z_i)``."""

from __future__ import annotations

import torch

from etda.features import blocks as fb
from etda.methods.base import MemberContext, MemberResult, Method, features_only


class GradDot(Method):
    name = "graddot"
    target = "loss"

    def member(self, train, test, ctx: MemberContext) -> MemberResult:
        return MemberResult(fb.inner(features_only(test), features_only(train)))

    def factors(self, train, test, ctx: MemberContext, block: int):
        from etda.outofcore import MemberFactors, feature_key

        feature_key(train)  # explicit features only
        left = fb.matrix(features_only(test)).to(torch.float64)
        return MemberFactors(left, train)
