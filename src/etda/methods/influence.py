"""Influence functions: ``tau_i(z) = grad L(z)^T (H + lam I)^-1 grad L(z_i)``.

The curvature ``H`` (``curvature=``):

* ``"gram"`` (default): the Gram of the per-example gradients, solved exactly (below);
* ``"kfac"`` / ``"ekfac"``: the Fisher, Kronecker-factored per Linear/Conv2d layer (EK-FAC
  with eigenvalues re-fitted in the Kronecker eigenbasis), fitted per member with labels
  sampled from the model (``fisher="sampled"``) or at the true labels (``"empirical"``).
  The featurizer preconditions every gradient with ``(H + lam I)^-1/2``
  (:mod:`etda.features.curvature`), so scores are dot products of its features; damping
  ``"auto"`` is the per-layer heuristic ``0.1 x mean eigenvalue`` (kronfluence's), ``"trace:C"``
  is ``C x mean eigenvalue`` per layer, a number is absolute.

Two solvers for the Gram curvature:

* ``solver="eigen"`` (default, any model): ``H`` is the Gauss-Newton/empirical-Fisher
  matrix of the training loss gradients, ``H = Phi^T Phi / n``, in projected (or exact,
  sample) space; one factorization serves every damping value.
* ``solver="cg"`` (small models): the exact Hessian of the mean training loss through
  Hessian-vector products and conjugate gradient, one solve per test example, in the
  full parameter space; needs flat features (projection ``identity`` or a flat projector).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp

from etda import batch
from etda.features.blocks import Features, TrainFeatures
from etda.features.curvature import CURVATURES, CurvatureSpec
from etda.methods.base import Diagonal, MemberContext, MemberFactors, Method
from etda.methods.solve import CRITERIA, DampedSystem, choose_damping


class InfluenceFunction(Method):
    name = "if"
    title = "IF"
    description = "influence functions (Gauss-Newton eigen solve, or exact-Hessian CG)"
    target = "loss"

    def __init__(
        self,
        damping: float | str = "auto",
        solver: str = "eigen",
        cg_iters: int = 200,
        cg_tol: float = 1e-10,
        form: str = "auto",
        curvature: str = "gram",
        fisher: str = "sampled",
        measure: str = "loss",
    ) -> None:
        if measure not in ("loss", "output"):
            raise ValueError(f"measure must be 'loss' or 'output', got {measure!r}")
        self.measure = measure
        if solver not in ("eigen", "cg"):
            raise ValueError(f"solver must be 'eigen' or 'cg', got {solver!r}")
        if curvature not in ("gram", *CURVATURES):
            raise ValueError(f"curvature must be 'gram', 'kfac' or 'ekfac', got {curvature!r}")
        self.curvature_kind, self.fisher = curvature, fisher
        if curvature != "gram":
            if solver != "eigen":
                raise ValueError(f"curvature={curvature!r} has its own solve; drop solver=")
            self._spec(0, damping)  # validates fisher and damping now
        if solver == "cg" and (
            isinstance(damping, bool) or not isinstance(damping, int | float) or damping <= 0
        ):
            raise ValueError("IF with solver='cg' needs a positive numeric damping (e.g. 1e-3)")
        self.damping, self.solver, self.form = damping, solver, form
        self.cg_iters, self.cg_tol = cg_iters, cg_tol

    def options(self) -> dict:
        opts = {"damping": self.damping, "solver": self.solver, "form": self.form}
        if self.curvature_kind != "gram":
            opts |= {"curvature": self.curvature_kind, "fisher": self.fisher}
        if self.measure != "loss":
            opts["measure"] = self.measure
        return opts

    @property
    def test_target(self) -> str | None:
        # measure="output": the influence on the test output (TRAK's margin / log-likelihood,
        # what LDS ground truths record) instead of the test loss
        return "output" if self.measure == "output" else None

    def _signed(self, f: MemberFactors) -> MemberFactors:
        """Positive = helps: upweighting a training example lowers the test loss by
        ``g_L^T H^-1 g_i`` but raises the test output by ``-g_f^T H^-1 g_i``."""
        if self.measure == "output":
            f.left = -f.left
        return f

    def _spec(self, seed: int, damping: float | str) -> CurvatureSpec:
        if isinstance(damping, str) and damping != "auto" and not damping.startswith("trace:"):
            raise ValueError(
                f"curvature={self.curvature_kind!r} takes damping 'auto' (0.1 x the mean "
                f"eigenvalue per layer), 'trace:C' or a number >= 0, got {damping!r}"
            )
        return CurvatureSpec(
            self.curvature_kind,
            self.fisher,
            "heuristic" if damping == "auto" else damping,
            seed,
        )

    def curvature(self, seed: int) -> CurvatureSpec | None:
        return None if self.curvature_kind == "gram" else self._spec(seed, self.damping)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"model"}) if self.solver == "cg" else frozenset()

    @property
    def streamable(self) -> bool:
        return self.solver == "eigen" and self.damping not in CRITERIA

    @property
    def default_projection(self) -> str:
        # CG works in the full parameter space: exact flat gradients unless told otherwise.
        return "identity" if self.solver == "cg" else "auto"

    @property
    def dense_features(self) -> bool:
        """Preconditioned gradients are dense (no layer keeps its Kronecker factors)."""
        return self.curvature_kind != "gram"

    @property
    def has_diagonal(self) -> bool:
        return self.solver == "eigen" and self.measure == "loss"

    def _system(self, train: TrainFeatures):
        system = DampedSystem(train, self.form)
        n = system.n
        # H = Phi^T Phi / n, so (H + lam I)^-1 = n (Phi^T Phi + n lam I)^-1.
        d = choose_damping(system, self.damping, y=train.q, scale=n)
        info = {"damping": {**d.to_dict(), "lam_H": d.lam / n}, "form": system.form}
        return system, d, info

    def factors(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        if self.curvature_kind != "gram":  # features are preconditioned: dot products
            info = {"curvature": ctx.curvature_info}
            if train.explicit_width is not None:
                return self._signed(MemberFactors(test.rows(0, test.n), "feature", info=info))
            return self._signed(MemberFactors(train.inner(test), "sample", info=info))
        if self.solver == "cg":
            return self._signed(self._cg(train, test, ctx))
        system, d, info = self._system(train)
        left = system.left(test, d.lam, scale=system.n)
        return self._signed(MemberFactors(left, system.form, info=info))

    def diagonal(self, train: TrainFeatures, ctx: MemberContext) -> Diagonal | None:
        if self.curvature_kind != "gram":
            return Diagonal(train.sq_norms(), info={"curvature": ctx.curvature_info})
        if self.solver == "cg":
            return None
        system, d, info = self._system(train)
        return Diagonal(float(system.n) * system.diagonal(d.lam), info=info)

    def _cg(self, train: TrainFeatures, test: Features, ctx: MemberContext) -> MemberFactors:
        fz = ctx.featurizer
        if fz is None or fz.flat_proj is None:
            raise ValueError(
                "IF with solver='cg' needs a flat projection: projection='identity' (exact), "
                "'gaussian', 'rademacher' or 'sparse'"
            )
        from etda.features.capture import (
            TaskForward,
            capture,
            flat_gradient,
            prefixed,
            set_example_index,
        )
        from etda.features.service import TEST_INDEX_OFFSET

        model, task, names = ctx.model, ctx.task, ctx.params
        x, y = ctx.train_xy()
        xt, yt = ctx.test_xy()
        set_example_index(model, torch.arange(batch.n_rows(xt)) + TEST_INDEX_OFFSET)
        cap = capture(model, task, "loss", xt, yt, fz.layers, fz.rest)
        test_g = flat_gradient(cap, fz.layers, fz.params, fz.shapes).to(torch.float64)
        set_example_index(model, torch.arange(batch.n_rows(x)))  # training masks for the Hessian
        params = {n: p.detach() for n, p in model.named_parameters()}
        wrt = {n: params[n] for n in names}
        with torch.no_grad():
            batch.run_model(model, x if _per_example(model) else batch.take(x, 0, 1), task)
        buffers = prefixed(dict(model.named_buffers()))
        call = TaskForward(model, task)

        def mean_loss(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(call, (prefixed({**params, **p}), buffers), (x,))
            return task.loss(out, y).mean()

        g = grad(mean_loss)
        sizes = [wrt[n].numel() for n in names]
        dtype = next(iter(wrt.values())).dtype

        def hvp(v: Tensor) -> Tensor:
            vd = {
                n: c.view(wrt[n].shape).to(dtype)
                for n, c in zip(names, v.split(sizes), strict=True)
            }
            out = jvp(g, (wrt,), (vd,))[1]
            return torch.cat([out[n].reshape(-1) for n in names]).to(torch.float64)

        lam = float(self.damping)
        solved = torch.stack(
            [_cg(lambda v: hvp(v) + lam * v, row, self.cg_iters, self.cg_tol) for row in test_g]
        )
        left = fz.flat_proj(solved)  # same projection as the training features
        info = {"damping": {"lam": lam, "rule": "fixed"}, "solver": "cg"}
        return MemberFactors(left, "feature", info=info)


def _per_example(model) -> bool:
    return any(getattr(m, "per_example", False) for m in model.modules())


def _cg(apply, b: Tensor, iters: int, tol: float) -> Tensor:
    """Conjugate gradient for a symmetric positive definite operator ``apply``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    b2 = b @ b
    for _ in range(iters):
        if rs <= tol * tol * b2:
            return x
        ap = apply(p)
        curvature = p @ ap
        if curvature <= 0:
            raise ValueError(
                "IF solver='cg': the damped Hessian is not positive definite (negative "
                "curvature); raise damping or use solver='eigen' (Gauss-Newton)"
            )
        alpha = rs / curvature
        x += alpha * p
        r -= alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    if rs > 1e-6 * b2:
        raise ValueError(
            f"IF solver='cg' did not converge in {iters} iterations (relative residual "
            f"{float((rs / b2).sqrt()):.2e}); raise damping or cg_iters"
        )
    return x
