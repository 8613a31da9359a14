"""TRAK: ``tau(z) = phi(z)^T (Phi^T Phi + lam I)^-1 Phi^T * Q`` with gradients of the margin.

Members combine by averaging the kernel term and Q separately (Park et al., 2023).
Damping: ``"auto"`` (the spectral-mean rule of ``etda.methods.solve``), ``"gcv"``,
``"trace:c"`` or a number. The solve runs in feature or sample space (``form``), whichever is
smaller; with projection ``"none"`` it is exact (no projection error).
"""

from __future__ import annotations

from etda.features.blocks import Features, TrainFeatures
from etda.methods.base import Diagonal, KernelTimesMeanQ, MemberContext, MemberFactors, Method
from etda.methods.solve import DampedSystem, choose_damping


class TRAK(Method):
    name = "trak"
    title = "TRAK"
    description = "projected-gradient kernel regression of the margin (Park et al., 2023)"
    target = "output"
    combine = KernelTimesMeanQ()

    def __init__(self, damping: float | str = "auto", form: str = "auto") -> None:
        self.damping, self.form = damping, form

    def options(self) -> dict:
        return {"damping": self.damping, "form": self.form}

    @property
    def streamable(self) -> bool:
        return self.damping != "gcv"

    def _system(self, train: TrainFeatures):
        system = DampedSystem(train, self.form)
        return system, choose_damping(system, self.damping, y=train.q)

    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        system, d = self._system(train)
        info = {"damping": d.to_dict(), "form": system.form}
        return MemberFactors(system.left(test, d.lam), system.form, q=train.q, info=info)

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal:
        system, d = self._system(train)
        info = {"damping": d.to_dict(), "form": system.form}
        return Diagonal(system.diagonal(d.lam), q=train.q, info=info)
