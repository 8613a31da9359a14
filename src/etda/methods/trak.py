"""TRAK: ``tau(z) = phi(z)^T (Phi^T Phi + lam I)^-1 Phi^T * Q`` with gradients of the margin.

Members combine by averaging the kernel term and Q separately (Park et al., 2023).
Damping: ``"auto"`` (the spectral-mean rule of ``etda.methods.solve``), ``"gcv"``,
``"trace:c"`` or a number. The solve runs in feature or sample space (``form``), whichever is
smaller; with projection ``"none"`` it is exact (no projection error).
"""

from __future__ import annotations

import torch

from etda.features import blocks as fb
from etda.methods.base import MemberContext, MemberResult, Method, features_only
from etda.methods.solve import DampedSystem, GramSystem, choose_damping


class TRAK(Method):
    name = "trak"
    target = "output"
    combine = "trak"

    def __init__(self, damping: float | str = "auto", form: str = "auto") -> None:
        self.damping, self.form = damping, form

    def options(self) -> dict:
        return {"damping": self.damping, "form": self.form}

    def member(self, train, test, ctx: MemberContext) -> MemberResult:
        system = DampedSystem(features_only(train), self.form)
        d = choose_damping(system, self.damping, y=torch.as_tensor(train["q"][:, 0]))
        values = system.solve(features_only(test), d.lam)
        info = {"damping": d.to_dict(), "form": system.form}
        return MemberResult(values, q=torch.as_tensor(train["q"][:, 0]).double(), info=info)

    def factors(self, train, test, ctx: MemberContext, block: int):
        from etda.outofcore import MemberFactors, train_stats

        stats = train_stats(train, block)
        system = GramSystem(stats.gram, train.n)
        d = choose_damping(system, self.damping)
        left = system.left(fb.matrix(features_only(test)), d.lam)
        info = {"damping": d.to_dict(), "form": "feature (streamed)"}
        return MemberFactors(left, train, q=stats.q, info=info)
