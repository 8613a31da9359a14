"""TRAK: ``tau(z) = phi(z)^T (Phi^T Phi + lam I)^-1 Phi^T * Q`` with gradients of the margin.

Members combine by averaging the kernel term and Q separately (Park et al., 2023).
Damping: ``"auto"`` (the spectral-mean rule of ``etda.methods.solve``), ``"gcv"``,
``"evidence"``, ``"edof:f"``, ``"trace:c"`` or a number. The solve runs in feature or sample
space (``form``), whichever is smaller; with projection ``"none"`` it is exact (no projection
error).

``solve="shared"``: instead of one solve per member, the members' kernels (``Phi_m Phi_m^T``)
and test-train kernels are averaged and solved once, with the damping rule applied to the
average: TRAK on every member's features side by side (``[Phi_1, ..., Phi_M] / sqrt(M)``),
one Cholesky for the ensemble. It needs the ``n x n`` kernels in memory.
"""

from __future__ import annotations

from torch import Tensor

from etda.features.blocks import Features, TrainFeatures
from etda.methods.base import Diagonal, KernelTimesMeanQ, MemberContext, MemberFactors, Method
from etda.methods.solve import CRITERIA, DampedSystem, choose_damping

SOLVES = ("member", "shared")


class TRAK(Method):
    name = "trak"
    title = "TRAK"
    description = "projected-gradient kernel regression of the margin (Park et al., 2023)"
    target = "output"
    combine = KernelTimesMeanQ()

    def __init__(self, damping: float | str = "auto", form: str = "auto", solve: str = "member"):
        if solve not in SOLVES:
            raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
        self.damping, self.form, self.solve = damping, form, solve

    def options(self) -> dict:
        return {"damping": self.damping, "form": self.form, "solve": self.solve}

    @property
    def streamable(self) -> bool:
        return self.damping not in CRITERIA and self.solve == "member"

    @property
    def shared_solve(self) -> bool:
        return self.solve == "shared"

    def solve_shared(
        self, kernel: Tensor, cross: Tensor, q: Tensor | None, width: int | None
    ) -> tuple[Tensor, dict]:
        system = DampedSystem.from_kernel(kernel, width)
        d = choose_damping(system, self.damping, y=q)
        left = system.left_from_cross(cross, d.lam)
        return left * q[None, :], {"damping": d.to_dict(), "form": "shared"}

    def _system(self, train: TrainFeatures):
        system = DampedSystem(train, self.form)
        return system, choose_damping(system, self.damping, y=train.q)

    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        if self.shared_solve:  # kernels only: the scorer averages them and solves once
            kernel, cross = train.inner(train), train.inner(test)
            return MemberFactors(cross, "kernel", q=train.q, kernel=kernel)
        system, d = self._system(train)
        info = {"damping": d.to_dict(), "form": system.form}
        return MemberFactors(system.left(test, d.lam), system.form, q=train.q, info=info)

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal:
        if self.shared_solve:
            raise ValueError(
                "self-influence with TRAK(solve='shared') is not available; use solve='member'"
            )
        system, d = self._system(train)
        info = {"damping": d.to_dict(), "form": system.form}
        return Diagonal(system.diagonal(d.lam), q=train.q, info=info)
