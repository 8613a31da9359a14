"""Influence functions: ``tau_i(z) = grad L(z)^T (H + lam I)^-1 grad L(z_i)``.

Two solvers over the same features:

* ``solver="eigen"`` (default, any model): ``H`` is the Gauss-Newton/empirical-Fisher
  matrix of the training loss gradients, ``H = Phi^T Phi / n``, in projected (or exact,
  sample) space; one eigendecomposition serves every damping value.
* ``solver="cg"`` (small models): the exact Hessian of the mean training loss through
  Hessian-vector products and conjugate gradient, one solve per test example, in the
  full parameter space; needs flat features (projection ``identity`` or a flat projector).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp

from etda.features import blocks as fb
from etda.methods.base import MemberContext, MemberResult, Method, features_only
from etda.methods.solve import DampedSystem, GramSystem, choose_damping


class InfluenceFunction(Method):
    name = "if"
    target = "loss"

    def __init__(
        self,
        damping: float | str = "auto",
        solver: str = "eigen",
        cg_iters: int = 200,
        cg_tol: float = 1e-10,
        form: str = "auto",
    ) -> None:
        if solver not in ("eigen", "cg"):
            raise ValueError(f"solver must be 'eigen' or 'cg', got {solver!r}")
        self.damping, self.solver, self.form = damping, solver, form
        self.cg_iters, self.cg_tol = cg_iters, cg_tol

    def options(self) -> dict:
        return {"damping": self.damping, "solver": self.solver, "form": self.form}

    def member(self, train, test, ctx: MemberContext) -> MemberResult:
        if self.solver == "cg":
            return self._cg(train, test, ctx)
        system = DampedSystem(features_only(train), self.form)
        n = system.n
        # H = Phi^T Phi / n, so (H + lam I)^-1 = n (Phi^T Phi + n lam I)^-1.
        d = choose_damping(system, self.damping, y=torch.as_tensor(train["q"][:, 0]), scale=n)
        info = {"damping": {**d.to_dict(), "lam_H": d.lam / n}, "form": system.form}
        return MemberResult(system.solve(features_only(test), d.lam, scale=n), info=info)

    def factors(self, train, test, ctx: MemberContext, block: int):
        from etda.outofcore import MemberFactors, train_stats

        if self.solver == "cg":
            raise ValueError("IF solver='cg' has no out-of-core form; use solver='eigen'")
        stats = train_stats(train, block)
        n = train.n
        system = GramSystem(stats.gram, n)
        d = choose_damping(system, self.damping, scale=n)
        left = system.left(fb.matrix(features_only(test)), d.lam, scale=n)
        info = {"damping": {**d.to_dict(), "lam_H": d.lam / n}, "form": "feature (streamed)"}
        return MemberFactors(left, train, info=info)

    def _cg(self, train, test, ctx: MemberContext) -> MemberResult:
        fz = ctx.featurizer
        if fz is None or fz.flat_proj is None:
            raise ValueError(
                "IF with solver='cg' needs a flat projection: projection='identity' (exact), "
                "'gaussian', 'rademacher' or 'sparse'"
            )
        if not isinstance(self.damping, int | float) or self.damping <= 0:
            raise ValueError("IF with solver='cg' needs a positive numeric damping (e.g. 1e-3)")
        from etda.features.capture import capture, flat_gradient

        model, task, names = ctx.model, ctx.task, ctx.params
        x, y = ctx.train_xy
        xt, yt = ctx.test_xy
        _set_index(model, torch.arange(xt.shape[0]) + (1 << 40))
        cap = capture(model, task, "loss", xt, yt, fz.layers, fz.rest)
        test_g = flat_gradient(cap, fz.layers, fz.params, fz.shapes).to(torch.float64)
        _set_index(model, torch.arange(x.shape[0]))  # training masks for the Hessian
        params = {n: p.detach() for n, p in model.named_parameters()}
        wrt = {n: params[n] for n in names}
        with torch.no_grad():
            model(x[:1] if not _per_example(model) else x)  # materialize masks
        buffers = dict(model.named_buffers())

        def mean_loss(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, ({**params, **p}, buffers), (x,))
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
        right = torch.as_tensor(train["g" if "g" in train else "phi"]).to(torch.float64)
        info = {"damping": {"lam": lam, "rule": "fixed"}, "solver": "cg"}
        return MemberResult(left @ right.T, info=info)


def _set_index(model, index: Tensor) -> None:
    for m in model.modules():
        if hasattr(m, "set_index"):
            m.set_index(index)


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
