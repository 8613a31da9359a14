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
* ``"evidence"``: the ``lam`` that maximizes the evidence (log marginal likelihood) of the
  linearized Bayesian ridge model of the same targets, ``y = Phi w + eps`` with
  ``w ~ N(0, s2_w I)``, ``eps ~ N(0, s2 I)`` and ``lam = s2 / s2_w``; with the scale
  profiled out (``s2_w = y^T (K + lam I)^-1 y / n``) it is
  ``-n/2 (1 + log 2 pi + log(y^T (K + lam I)^-1 y / n)) - 1/2 log det(K + lam I)``, on the
  same grid as GCV, exact from the same eigendecomposition or by Lanczos quadrature (the log
  determinant by stochastic Lanczos quadrature, Ubaru, Chen & Saad, 2017). It needs no
  retraining and no ground truth, but a trained model's Q misleads it: near a stationary
  point TRAK's Q is weakly aligned with the margin gradients (``Q^T K Q / Q^T Q`` is 0.3-7
  times the mean eigenvalue, against ~300 for the margins themselves), so the evidence reads
  most of it as noise and picks ``c`` of 16-100; IF's loss gradients are the margin gradients
  scaled by Q, so Q looks noiseless and it picks the grid's smallest ``c``. Over fmnist-mlp
  and fmnist2-cnn (one model, naive and checkpoint ensembles) it is within one standard error
  of the best swept ``lam`` in 2 of 14 cases against 13 for ``"auto"``, also when chosen on
  the ensemble's mean kernel (``benchmarks/damping.py``): offered, not the default;
* ``"edof:f"``: the ``lam`` whose effective degrees of freedom
  ``tr(K (K + lam I)^-1) = sum_i e_i / (e_i + lam)`` equal ``f * min(n, k)``
  (``0 < f <= 1``; no targets), interpolated on a fine log grid. ``edof:0.1`` (what the
  spectral mean gives one fmnist-mlp TRAK model) is within one standard error of the best in
  9 of the same 14 cases: it moves ``c`` with the spectrum (1-2.8 for TRAK, 0.4-1.3 for IF
  on fmnist2-cnn) but damps IF on fmnist-mlp too little (c = 0.4 where 1 is best);
* a number: the absolute ``lam``.

Criteria that read the features (``gcv``, ``evidence``, ``edof``) run per member, on that
member's system; ``TRAK(solve="shared")`` applies them to the ensemble's mean kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from etda.features.blocks import Features, TrainFeatures, blas_threads

GRID = torch.logspace(-4, 2, 31, dtype=torch.float64)
EDOF_GRID = torch.logspace(-6, 4, 101, dtype=torch.float64)  # c values, interpolated
EXACT_GCV_MAX = 2048  # eigendecomposition up to this min(n, k), Lanczos quadrature above
CRITERIA = ("gcv", "evidence")  # target-based rules chosen on GRID


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
        # the factorization's and solves' precision (float64 unless solve_dtype asks)
        self.solve_dtype = getattr(train, "solve_precision", torch.float64)
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
            # the fast path (float32 kernel and solves) keeps the n x n kernel in float32
            fast = self.solve_dtype == torch.float32 and train.precision == torch.float32
            self.kmat = train.inner(train, torch.float32) if fast else train.inner(train)
            self.trace = float(self.kmat.diagonal().double().sum())
        self.dim = min(self.n, k) if k is not None else self.n

    @classmethod
    def from_kernel(cls, kmat: Tensor, width: int | None = None) -> DampedSystem:
        """The sample-space system of a given kernel ``(n, n)`` (e.g. an ensemble's mean
        kernel) of features ``width`` wide (None: at least n); test sides come as cross
        kernels (:meth:`left_from_cross`)."""
        system = cls.__new__(cls)
        system.train, system.n, system.form = None, int(kmat.shape[0]), "sample"
        system.solve_dtype = torch.float64
        system.kmat = kmat.to(torch.float64)
        system.trace = float(system.kmat.diagonal().sum())
        system.dim = system.n if width is None else min(system.n, width)
        return system

    def left_from_cross(self, cross: Tensor, lam: float) -> Tensor:
        """``cross (K + lam I)^-1`` ``(n_test, n)`` for a test-train kernel ``cross``."""
        if self.form != "sample":
            raise ValueError("left_from_cross needs the sample-space form")
        return self._solve(cross.T, self._factor(lam)).T

    @property
    def base(self) -> float:
        """``tr(K) / min(n, k)``: the mean eigenvalue, the unit of relative damping."""
        return self.trace / self.dim

    def _factor(self, lam: float) -> Tensor:
        """The Cholesky factor of the damped system, in ``solve_dtype`` (float32: LAPACK's
        ``spotrf``, :func:`_cholesky32`; :func:`_cholesky` is float64 only)."""
        source = self.gram if self.form == "feature" else self.kmat
        if self.solve_dtype == torch.float32:
            return _cholesky32(source, lam)
        a = source.to(self.solve_dtype, copy=True)
        a.diagonal().add_(lam)
        return _cholesky(a)

    def _solve(self, rhs: Tensor, chol: Tensor) -> Tensor:
        """``(A + lam I)^-1 rhs`` float64 from the factor ``chol`` (solved in its dtype)."""
        if chol.dtype == torch.float32:
            return _cholesky_solve32(rhs, chol).to(torch.float64)
        return torch.cholesky_solve(rhs.to(chol.dtype), chol).to(torch.float64)

    def left(self, test: Features, lam: float, scale: float = 1.0) -> Tensor:
        """The test-side factor: ``scale * phi_test (Phi^T Phi + lam I)^-1`` ``(n_test, k)``
        in feature space; ``scale * K_test,train (K + lam I)^-1`` ``(n_test, n)`` in sample
        space. Either way ``tau = left @ Phi^T`` (feature) or ``tau = left`` (sample)."""
        chol = self._factor(lam)
        if self.form == "feature":
            return scale * self._solve(test.matrix().T, chol).T
        cross = self.train.inner(test)  # (m, n)
        return scale * self._solve(cross.T, chol).T

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
                right = self._solve(phi.T, chol)  # (k, rows)
                out[lo:hi] = (phi * right.T).sum(1)
            return out
        a = self.kmat.to(torch.float64, copy=True)
        a.diagonal().add_(lam)
        chol = _cholesky(a)  # may add jitter to a's diagonal in place
        shift = float((a.diagonal() - self.kmat.diagonal().double()).mean())
        # K (K + s I)^-1 = I - s (K + s I)^-1: one triangular inverse instead of an n x n solve.
        return 1.0 - shift * torch.cholesky_inverse(chol).diagonal()

    def _phi(self) -> Tensor:
        if not self.train.in_memory:
            raise ValueError(
                "damping='gcv' or 'evidence' (and 'edof:F' above EXACT_GCV_MAX features) is "
                "not available for out-of-core scoring; use 'auto', 'trace:C' or a number"
            )
        if not hasattr(self, "_phi_cache"):
            self._phi_cache = self.train.rows(0, self.n)
        return self._phi_cache

    def matvec(self, v: Tensor) -> Tensor:
        """``K v`` for ``v (n, r)``."""
        if self.form == "feature":
            phi = self._phi()
            return phi @ (phi.T @ v)
        return (self.kmat @ v.to(self.kmat.dtype)).to(v.dtype)

    def gcv(
        self, y: Tensor, lams: Tensor, steps: int = 80, probes: int = 16, seed: int = 0
    ) -> Tensor:
        """GCV(lam) for every ``lam``: exact while ``min(n, k)`` is small, else Lanczos."""
        if self.dim <= EXACT_GCV_MAX:
            return self.gcv_exact(y, lams)
        y = y.to(torch.float64)
        rss = _quadrature(self.matvec, y, lams, lambda s, lam: lam**2 / (s + lam) ** 2, steps)
        tr = self._probe_sum(lams, lambda s, lam: 1.0 / (s + lam), steps, probes, seed)
        tr_resid = lams * tr / probes  # tr(I - H) = lam tr((K + lam I)^-1)
        return self.n * rss / tr_resid.clamp_min(1e-300) ** 2

    def _probe_sum(
        self,
        lams: Tensor,
        f: Callable[[Tensor, Tensor], Tensor],
        steps: int,
        probes: int,
        seed: int,
    ) -> Tensor:
        """``sum_z z^T f(K, lam) z`` over ``probes`` Rademacher vectors ``z (n,)`` (Hutchinson
        with Lanczos quadrature), ``(len(lams),)``. The probes' Lanczos nodes are kept, so
        further criteria on the same system cost no more matrix products."""
        cache = self.__dict__.setdefault("_probe_nodes", {})
        if (steps, probes, seed) not in cache:
            g = torch.Generator().manual_seed(seed)
            nodes = []
            for _ in range(probes):
                z = torch.randint(0, 2, (self.n,), generator=g).to(torch.float64) * 2 - 1
                nodes.append((z @ z, *_lanczos(self.matvec, z, steps)))
            cache[(steps, probes, seed)] = nodes
        total = torch.zeros_like(lams)
        for zz, theta, weights in cache[(steps, probes, seed)]:
            total += zz * (weights[None, :] * f(theta[None, :], lams[:, None])).sum(1)
        return total

    def _eigh(self) -> tuple[Tensor, Tensor]:
        """``eigh`` of the smaller Gram matrix, kept: every exact criterion reads it."""
        if "_eig" not in self.__dict__:
            a = self.gram if self.form == "feature" else self.kmat.to(torch.float64)
            self._eig = tuple(torch.linalg.eigh(a))
        return self._eig

    def _spectrum(self, y: Tensor | None) -> tuple[Tensor, Tensor | None, float, int]:
        """The eigenvalues ``s`` of ``K`` from the smaller Gram matrix (its nonzero ones in
        feature space), the targets ``y (n,)`` in their eigenvectors ``by`` (None without
        targets), ``||y||^2`` outside them and the number of zero eigenvalues left out."""
        s, vecs = self._eigh()
        s = s.clamp_min(0)
        if self.form == "sample":
            return s, None if y is None else vecs.T @ y.to(torch.float64), 0.0, 0
        nz = s > s.max() * 1e-12
        extra = self.n - int(nz.sum())  # directions of K with eigenvalue 0
        if y is None:
            return s[nz], None, 0.0, extra
        y = y.to(torch.float64)
        by = (self._phi() @ vecs[:, nz]).T @ y / s[nz].sqrt()
        return s[nz], by, max(float(y @ y) - float(by @ by), 0.0), extra

    def gcv_exact(self, y: Tensor, lams: Tensor) -> Tensor:
        """GCV from an eigendecomposition of the smaller Gram matrix (reference)."""
        s, by, outside, extra = self._spectrum(y)
        shrink = lams[:, None] / (s[None, :] + lams[:, None])
        rss = (shrink**2 * by[None, :] ** 2).sum(1) + outside
        return self.n * rss / (shrink.sum(1) + extra) ** 2

    def evidence(
        self, y: Tensor, lams: Tensor, steps: int = 80, probes: int = 16, seed: int = 0
    ) -> Tensor:
        """The profiled log evidence (nats) for every ``lam`` ``(len(lams),)``: exact while
        ``min(n, k) <= EXACT_GCV_MAX``, else Lanczos quadrature (``probes`` for the log det)."""
        if self.dim <= EXACT_GCV_MAX:
            return self.evidence_exact(y, lams)
        y = y.to(torch.float64)
        quad = _quadrature(self.matvec, y, lams, lambda s, lam: 1.0 / (s + lam), steps)
        logdet = self._probe_sum(lams, lambda s, lam: torch.log(s + lam), steps, probes, seed)
        return _profiled_evidence(self.n, quad, logdet / probes)

    def evidence_exact(self, y: Tensor, lams: Tensor) -> Tensor:
        """The profiled log evidence from an eigendecomposition (reference)."""
        s, by, outside, extra = self._spectrum(y)
        quad = (by[None, :] ** 2 / (s[None, :] + lams[:, None])).sum(1) + outside / lams
        logdet = torch.log(s[None, :] + lams[:, None]).sum(1) + extra * torch.log(lams)
        return _profiled_evidence(self.n, quad, logdet)

    def edof(self, lams: Tensor, steps: int = 80, probes: int = 16, seed: int = 0) -> Tensor:
        """Effective degrees of freedom ``tr(K (K + lam I)^-1)`` for every ``lam``: exact
        while ``min(n, k) <= EXACT_GCV_MAX``, else Hutchinson with Lanczos quadrature."""
        if self.dim <= EXACT_GCV_MAX:
            s = self._spectrum(None)[0]
            return (s[None, :] / (s[None, :] + lams[:, None])).sum(1)
        # z^T K (K + lam I)^-1 z directly: n - lam tr((K + lam I)^-1) would cancel badly
        return self._probe_sum(lams, lambda s, lam: s / (s + lam), steps, probes, seed) / probes


def _profiled_evidence(n: int, quad: Tensor, logdet: Tensor) -> Tensor:
    """``log N(y; 0, s2_w (K + lam I))`` at the best ``s2_w = quad / n``, from
    ``quad = y^T (K + lam I)^-1 y`` and ``logdet = log det(K + lam I)``."""
    return -0.5 * n * (1.0 + math.log(2 * math.pi) + torch.log(quad / n)) - 0.5 * logdet


def _cholesky(a: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # numerically singular: add the smallest jitter that works
        eps = 1e-10 * float(a.diagonal().mean())
        while int(info) != 0:
            a.diagonal().add_(eps)
            chol, info = torch.linalg.cholesky_ex(a)
            eps *= 10
    return chol


def _cholesky32(source: Tensor, lam: float) -> Tensor:
    """The lower Cholesky factor ``(n, n)`` float32 of the symmetric ``source + lam I``, by
    LAPACK ``spotrf`` through SciPy on as many threads as torch uses (faster than torch's
    own on CPUs), factored in place of one float32 copy; jitter as :func:`_cholesky` when
    numerically singular."""
    from scipy.linalg import lapack

    eps = 1e-6 * float(source.diagonal().mean())
    with blas_threads():
        while True:
            a = source.to(torch.float32, copy=True)
            a.diagonal().add_(lam)
            # a is symmetric: its transpose is the column-major array LAPACK wants, no copy
            chol, info = lapack.spotrf(a.numpy().T, lower=1, overwrite_a=1, clean=1)
            if info == 0:
                return torch.from_numpy(chol)
            lam += eps
            eps *= 10


def _cholesky_solve32(rhs: Tensor, chol: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` float32 ``(n, m)`` for a lower factor from :func:`_cholesky32`."""
    from scipy.linalg import lapack

    with blas_threads():
        x, info = lapack.spotrs(chol.numpy(), rhs.to(torch.float32).numpy(), lower=1)
    if info != 0:
        raise ValueError(f"LAPACK spotrs failed (info={info})")
    return torch.from_numpy(x)


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
    ``"auto"`` (spectral mean), ``"trace:c"``, ``"edof:f"``, or ``"gcv"`` / ``"evidence"``
    (on targets ``y (n,)``)."""
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
    if damping in CRITERIA:
        return _by_criterion(system, str(damping), y)
    if isinstance(damping, str) and damping.startswith("edof:"):
        return _by_edof(system, edof_fraction(damping))
    raise ValueError(
        "damping must be a number, 'auto', 'gcv' or 'trace:C' (C x auto); or 'evidence' or "
        f"'edof:F' (0 < F <= 1), got {damping!r}"
    )


def edof_fraction(damping: str) -> float:
    """The fraction ``f`` of ``"edof:f"``, checked to lie in ``(0, 1]``."""
    try:
        f = float(damping.split(":", 1)[1])
    except ValueError:
        f = math.nan
    if not 0 < f <= 1:
        raise ValueError(f"damping {damping!r}: edof:F needs a fraction 0 < F <= 1, e.g. edof:0.1")
    return f


def _check_system(system: DampedSystem, rule: str) -> None:
    if not (math.isfinite(system.trace) and system.trace > 0):
        raise ValueError(
            f"damping={rule!r} needs finite, nonzero training features (the kernel's trace is "
            f"{system.trace}); check the model's gradients for NaN/inf"
        )


def _by_criterion(system: DampedSystem, rule: str, y: Tensor | None) -> Damping:
    """GCV (minimized) or the evidence (maximized) of the ridge regression of ``y`` on the
    features, over ``GRID`` in units of the spectral mean."""
    if y is None:
        raise ValueError(f"damping={rule!r} needs regression targets (the method's Q)")
    y = torch.as_tensor(y).to(torch.float64).reshape(-1)
    if y.shape[0] != system.n:
        raise ValueError(f"damping={rule!r}: {y.shape[0]} targets for {system.n} examples")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"damping={rule!r} needs finite targets; the targets hold NaN or inf")
    _check_system(system, rule)
    lams = GRID * system.base
    if rule == "gcv":
        curve = system.gcv(y, lams)
        i = int(torch.argmin(curve))
    else:
        if float(y @ y) == 0:
            raise ValueError("damping='evidence' needs targets that are not all zero")
        curve = system.evidence(y, lams)
        i = int(torch.argmax(curve))
    return Damping(float(lams[i]), rule, float(GRID[i]), lams.tolist(), curve.tolist())


def _by_edof(system: DampedSystem, f: float) -> Damping:
    """The ``lam`` with ``tr(K (K + lam I)^-1) = f min(n, k)``, interpolated in ``log lam``
    on ``EDOF_GRID`` (its edge when the target lies outside); curve: dof / min(n, k)."""
    _check_system(system, "edof")
    lams = EDOF_GRID * system.base
    frac = system.edof(lams) / system.dim  # decreasing in lam
    above = int((frac >= f).sum())  # frac[:above] >= f > frac[above:]
    if above == 0 or above == len(lams):
        lam = float(lams[0] if above == 0 else lams[-1])
    else:
        hi, lo = float(frac[above - 1]), float(frac[above])
        t = (hi - f) / (hi - lo) if hi > lo else 0.0
        log_lam = (1 - t) * math.log(float(lams[above - 1])) + t * math.log(float(lams[above]))
        lam = math.exp(log_lam)
    return Damping(lam, f"edof:{f:g}", lam / system.base, lams.tolist(), frac.tolist())
