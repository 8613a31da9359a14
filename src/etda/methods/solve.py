"""Damped linear solves shared by TRAK and influence functions, and automatic damping.

Both methods need ``phi_test (Phi^T Phi + lam I)^-1 Phi^T`` for training features
``Phi (n, k)``, solved with a Cholesky factorization in whichever space is smaller:

* feature space (explicit features, ``k <= n``): ``(Phi^T Phi + lam I)``, ``k x k``;
* sample space (Woodbury; any features, including exact gradient kernels without
  projection): ``phi_test Phi^T (K + lam I)^-1`` with ``K = Phi Phi^T``, ``n x n``.

Damping rules (``damping=``):

* ``"auto"`` (default): the *spectral-mean rule* ``lam = tr(Phi^T Phi) / min(n, k)``, the
  mean eigenvalue of the smaller of the two Gram matrices (``k x k`` in feature space,
  ``n x n`` in sample space). It is scale-free, costs nothing, and grows with ``k`` the way
  the projection noise does, so a larger projection never makes TRAK worse. On
  fmnist-mlp it lands within 0.01 LDS of the sweep's best ``lam`` at k = 512, 2048 and
  without projection (``benchmarks/quality.py``), where the undamped solve loses
  0.05-0.14 LDS and gets *worse* as k grows.
* ``"trace:c"``: ``c`` times the same unit (``c = 1`` is ``"auto"``);
* ``"gcv"``: generalized cross-validation of the ridge regression of the training
  residuals ``Q`` (TRAK's Newton-step targets) on the features,
  ``GCV(lam) = n ||(I - H) y||^2 / tr(I - H)^2`` with ``H = K (K + lam I)^-1``, over a
  log grid of ``c`` in ``[1e-4, 100]``; exact from an eigendecomposition when
  ``min(n, k) <= 2048``, else by Lanczos quadrature (Golub & von Matt, 1997). It needs
  no retraining but chooses too large a ``lam`` without projection (see the benchmark),
  so it is offered, not the default;
* a number: the absolute ``lam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from etda.features.blocks import Features, TrainFeatures

GRID = torch.logspace(-4, 2, 31, dtype=torch.float64)
EXACT_GCV_MAX = 2048


@dataclass
class Damping:
    """The chosen damping and how it was chosen (recorded with the scores)."""

    lam: float
    rule: str
    c: float | None = None  # lam / (tr(K) / min(n, k))
    grid: list[float] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "lam": self.lam,
            "rule": self.rule,
            "c": self.c,
            "grid": self.grid,
            "curve": self.curve,
        }


class DampedSystem:
    """The damped training system of one member, in feature or sample space.

    ``train`` is a feature view (:class:`etda.features.blocks.Features` in memory, or
    :class:`~etda.features.blocks.StreamedFeatures` on disk: feature space only). ``left``
    gives the test-side factor of ``phi_test (Phi^T Phi + lam I)^-1 Phi^T``, ``diagonal`` its
    diagonal with test = train (self-influence), ``gcv`` the damping criterion's curve.
    """

    def __init__(self, train: TrainFeatures | Mapping[str, Tensor], form: str = "auto") -> None:
        if isinstance(train, Mapping):  # feature blocks {name: (n, width)}
            train = Features(train)
        self.train = train
        self.n = train.n
        k = train.explicit_width
        if form == "auto":
            form = "feature" if k is not None and (k <= self.n or not train.in_memory) else "sample"
        if form not in ("feature", "sample"):
            raise ValueError(f"form must be 'auto', 'feature' or 'sample', got {form!r}")
        if form == "feature" and k is None:
            raise ValueError("the feature-space solve needs explicit (projected) features")
        if form == "sample" and not train.in_memory:
            raise ValueError(
                "form='sample' needs the n x n kernel in memory; out of core solves in "
                "feature space (form='auto' or 'feature')"
            )
        self.form = form
        if form == "feature":
            self.gram = train.gram()  # (k, k)
            self.trace = float(self.gram.diagonal().sum())
        else:
            self.kmat = train.inner(train)  # (n, n)
            self.trace = float(self.kmat.diagonal().sum())
        self.dim = min(self.n, k) if k is not None else self.n

    @classmethod
    def from_kernel(cls, kmat: Tensor, width: int | None = None) -> DampedSystem:
        """The sample-space system of a given kernel ``(n, n)`` (e.g. an ensemble's mean
        kernel) of features ``width`` wide (None: at least n); test sides come as cross
        kernels (:meth:`left_from_cross`)."""
        system = cls.__new__(cls)
        system.train, system.n, system.form = None, int(kmat.shape[0]), "sample"
        system.kmat = kmat.to(torch.float64)
        system.trace = float(system.kmat.diagonal().sum())
        system.dim = system.n if width is None else min(system.n, width)
        return system

    def left_from_cross(self, cross: Tensor, lam: float) -> Tensor:
        """``cross (K + lam I)^-1`` ``(n_test, n)`` for a test-train kernel ``cross``."""
        if self.form != "sample":
            raise ValueError("left_from_cross needs the sample-space form")
        return torch.cholesky_solve(cross.to(torch.float64).T, self._factor(lam)).T

    @property
    def base(self) -> float:
        """``tr(K) / min(n, k)``: the mean eigenvalue, the unit of relative damping."""
        return self.trace / self.dim

    def _factor(self, lam: float) -> Tensor:
        a = (self.gram if self.form == "feature" else self.kmat).clone()
        a.diagonal().add_(lam)
        return _cholesky(a)

    def left(self, test: Features, lam: float, scale: float = 1.0) -> Tensor:
        """The test-side factor: ``scale * phi_test (Phi^T Phi + lam I)^-1`` ``(n_test, k)``
        in feature space; ``scale * K_test,train (K + lam I)^-1`` ``(n_test, n)`` in sample
        space. Either way ``tau = left @ Phi^T`` (feature) or ``tau = left`` (sample)."""
        chol = self._factor(lam)
        if self.form == "feature":
            return scale * torch.cholesky_solve(test.matrix().to(torch.float64).T, chol).T
        cross = self.train.inner(test)  # (m, n)
        return scale * torch.cholesky_solve(cross.T, chol).T

    def solve(self, test: Features | Mapping[str, Tensor], lam: float) -> Tensor:
        """The damped scores ``phi_test (Phi^T Phi + lam I)^-1 Phi^T`` ``(n_test, n)`` (in
        memory: for references and benchmarks; the engine scores from :meth:`left`)."""
        test = Features(test) if isinstance(test, Mapping) else test
        left = self.left(test, lam)
        return left @ self.train.rows(0, self.n).T if self.form == "feature" else left

    def diagonal(self, lam: float) -> Tensor:
        """``diag(Phi (Phi^T Phi + lam I)^-1 Phi^T)`` ``(n,)`` without the ``n x n`` result."""
        if self.form == "feature":
            chol = self._factor(lam)
            out = torch.empty(self.n, dtype=torch.float64)
            for lo, hi in self.train.ranges():
                phi = self.train.rows(lo, hi)
                right = torch.cholesky_solve(phi.T, chol)  # (k, rows)
                out[lo:hi] = (phi * right.T).sum(1)
            return out
        a = self.kmat.clone()
        a.diagonal().add_(lam)
        chol = _cholesky(a)  # may add jitter to a's diagonal in place
        shift = float((a.diagonal() - self.kmat.diagonal()).mean())
        # K (K + s I)^-1 = I - s (K + s I)^-1: one triangular inverse instead of an n x n solve.
        return 1.0 - shift * torch.cholesky_inverse(chol).diagonal()

    def _phi(self) -> Tensor:
        if not self.train.in_memory:
            raise ValueError(
                "damping='gcv' is not available for out-of-core scoring; use 'auto', "
                "'trace:C' or a number"
            )
        if not hasattr(self, "_phi_cache"):
            self._phi_cache = self.train.rows(0, self.n)
        return self._phi_cache

    def matvec(self, v: Tensor) -> Tensor:
        """``K v`` for ``v (n, r)``."""
        if self.form == "feature":
            phi = self._phi()
            return phi @ (phi.T @ v)
        return self.kmat @ v

    def gcv(
        self, y: Tensor, lams: Tensor, steps: int = 80, probes: int = 16, seed: int = 0
    ) -> Tensor:
        """GCV(lam) for every ``lam``: exact while ``min(n, k)`` is small, else Lanczos."""
        if self.dim <= EXACT_GCV_MAX:
            return self.gcv_exact(y, lams)
        y = y.to(torch.float64)
        rss = _quadrature(self.matvec, y, lams, lambda s, lam: lam**2 / (s + lam) ** 2, steps)
        g = torch.Generator().manual_seed(seed)
        tr = torch.zeros_like(lams)
        for _ in range(probes):
            z = torch.randint(0, 2, (self.n,), generator=g).to(torch.float64) * 2 - 1
            tr += _quadrature(self.matvec, z, lams, lambda s, lam: 1.0 / (s + lam), steps)
        tr_resid = lams * tr / probes  # tr(I - H) = lam tr((K + lam I)^-1)
        return self.n * rss / tr_resid.clamp_min(1e-300) ** 2

    def gcv_exact(self, y: Tensor, lams: Tensor) -> Tensor:
        """GCV from an eigendecomposition of the smaller Gram matrix (reference)."""
        y = y.to(torch.float64)
        if self.form == "feature":
            phi = self._phi()
            s, v = torch.linalg.eigh(self.gram)
            s = s.clamp_min(0)
            nz = s > s.max() * 1e-12
            by = (phi @ v[:, nz]).T @ y / s[nz].sqrt()
            s = s[nz]
            outside = max(float(y @ y) - float(by @ by), 0.0)
            extra = self.n - int(nz.sum())  # directions with eigenvalue 0
        else:
            s, u = torch.linalg.eigh(self.kmat)
            s = s.clamp_min(0)
            by, outside, extra = u.T @ y, 0.0, 0
        shrink = lams[:, None] / (s[None, :] + lams[:, None])
        rss = (shrink**2 * by[None, :] ** 2).sum(1) + outside
        return self.n * rss / (shrink.sum(1) + extra) ** 2


def _cholesky(a: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # numerically singular: add the smallest jitter that works
        eps = 1e-10 * float(a.diagonal().mean())
        while int(info) != 0:
            a.diagonal().add_(eps)
            chol, info = torch.linalg.cholesky_ex(a)
            eps *= 10
    return chol


def _lanczos(matvec: Callable[[Tensor], Tensor], v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Tridiagonal ``T`` (as its eigenvalues and first eigenvector components)."""
    n = v.shape[0]
    steps = min(steps, n)
    q = torch.zeros(n, steps, dtype=torch.float64)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    q[:, 0] = v / v.norm()
    m = steps
    for j in range(steps):
        w = matvec(q[:, j : j + 1])[:, 0]
        alpha[j] = q[:, j] @ w
        w = w - q[:, : j + 1] @ (q[:, : j + 1].T @ w)  # full reorthogonalization
        w = w - q[:, : j + 1] @ (q[:, : j + 1].T @ w)
        if j + 1 < steps:
            b = w.norm()
            if b <= 1e-12 * max(1.0, float(alpha[: j + 1].abs().max())):
                m = j + 1
                break
            beta[j] = b
            q[:, j + 1] = w / b
    t = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, w = torch.linalg.eigh(t)
    return theta.clamp_min(0), w[0] ** 2


def _quadrature(
    matvec: Callable[[Tensor], Tensor],
    v: Tensor,
    lams: Tensor,
    f: Callable[[Tensor, Tensor], Tensor],
    steps: int,
) -> Tensor:
    """Gauss-quadrature estimate of ``v^T f(K, lam) v`` for every ``lam``."""
    theta, weights = _lanczos(matvec, v, steps)
    return (v @ v) * (weights[None, :] * f(theta[None, :], lams[:, None])).sum(1)


def choose_damping(
    system: DampedSystem,
    damping: float | str,
    y: Tensor | None = None,
    scale: float = 1.0,
) -> Damping:
    """Resolve ``damping``: a number (absolute, in units of ``Phi^T Phi / scale``),
    ``"auto"`` (spectral mean), ``"trace:c"`` or ``"gcv"`` (on targets ``y``)."""
    base = system.base
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        lam = float(damping) * scale
        return Damping(lam, "fixed", lam / base if base > 0 else None)
    if isinstance(damping, str) and damping.startswith("trace:"):
        c = float(damping.split(":", 1)[1])
        return Damping(c * base, "trace", c)
    if damping == "auto":
        return Damping(base, "spectral-mean", 1.0)
    if damping == "gcv":
        if y is None:
            raise ValueError("damping='gcv' needs regression targets")
        lams = GRID * base
        curve = system.gcv(y, lams)
        i = int(torch.argmin(curve))
        return Damping(float(lams[i]), "gcv", float(GRID[i]), lams.tolist(), curve.tolist())
    raise ValueError(f"damping must be a number, 'auto', 'gcv' or 'trace:C', got {damping!r}")
