"""Grad-Cos: cosine similarity of the loss gradients of ``z`` and ``z_i``."""

from __future__ import annotations

import torch

from etda.features import blocks as fb
from etda.methods.base import MemberContext, MemberResult, Method, features_only


class GradCos(Method):
    name = "gradcos"
    target = "loss"

    def member(self, train, test, ctx: MemberContext) -> MemberResult:
        tr, te = features_only(train), features_only(test)
        dots = fb.inner(te, tr)
        eps = torch.finfo(torch.float64).tiny
        norm_te = fb.sq_norms(te).sqrt().clamp_min(eps)
        norm_tr = fb.sq_norms(tr).sqrt().clamp_min(eps)
        return MemberResult(dots / norm_te[:, None] / norm_tr[None, :])

    def factors(self, train, test, ctx: MemberContext, block: int):
        from etda.outofcore import MemberFactors, train_stats

        eps = torch.finfo(torch.float64).tiny
        stats = train_stats(train, block, gram=False)
        left = fb.matrix(features_only(test)).to(torch.float64)
        left = left / fb.sq_norms(features_only(test)).sqrt().clamp_min(eps)[:, None]
        return MemberFactors(left, train, col_scale=1.0 / stats.sq_norms.sqrt().clamp_min(eps))
