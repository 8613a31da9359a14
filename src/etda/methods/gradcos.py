"""Grad-Cos: cosine similarity of the loss gradients of ``z`` and ``z_i``."""

from __future__ import annotations

import torch

from etda.features.blocks import Features, TrainFeatures
from etda.methods.base import Diagonal, MemberContext, MemberFactors, Method

EPS = torch.finfo(torch.float64).tiny


class GradCos(Method):
    name = "gradcos"
    title = "Grad-Cos"
    description = "cosine similarity of the loss gradients"
    target = "loss"

    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        norm_te = test.sq_norms().sqrt().clamp_min(EPS)
        if train.explicit_width is not None:
            left = test.rows(0, test.n) / norm_te[:, None]
            return MemberFactors(
                left, "feature", col_scale=1.0 / train.sq_norms().sqrt().clamp_min(EPS)
            )
        norm_tr = train.sq_norms().sqrt().clamp_min(EPS)
        return MemberFactors(train.inner(test) / norm_te[:, None] / norm_tr[None, :], "sample")

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal:
        raise ValueError(
            "Grad-Cos self-influence is the cosine of a gradient with itself, 1 for every "
            "example: it cannot rank mislabels. Use graddot, trak or if."
        )
