"""Kronecker-factored curvature (K-FAC, EK-FAC): fitted per member, applied to its gradients.

Influence with a curvature ``F`` scores ``g_test^T (F + lam I)^-1 g_train``. Writing the
preconditioner in its symmetric form ``P = (F + lam I)^-1/2``, that is the plain dot product
of the preconditioned gradients ``P g``: the featurizer applies ``P`` to every per-example
gradient it captures, and any method that takes dot products (Grad-Dot's scorer, the
out-of-core scorer, every ensemble) then computes curvature-aware influence unchanged.

For a Linear or Conv2d layer with per-example gradient ``G = sum_t d_t a_t^T`` (output
gradients ``d``, inputs ``a`` with a bias column), K-FAC approximates the layer's block of
``F`` by ``S (x) A`` with ``S = E[sum_t d_t d_t^T]`` and ``A = E_t[a a^T]`` (the Fisher when
the labels are drawn from the model, ``fisher="sampled"``; the empirical Fisher at the true
labels with ``fisher="empirical"``). In the eigenbases ``S = Q_S diag(s) Q_S^T`` and
``A = Q_A diag(a) Q_A^T``, the layer's preconditioned gradient is the rotated gradient
``Q_S^T G Q_A`` scaled elementwise by ``(Lam + lam)^-1/2`` with ``Lam = s a^T`` (K-FAC) or
``Lam_ij = E[(Q_S^T G Q_A)_ij^2]`` re-fitted on the data (EK-FAC, George et al. 2018), the
rotation being orthogonal. Parameters outside such layers get the diagonal Fisher.

Fitting is one pass over the training set (two for EK-FAC) in chunks, with float64 sums in
example order: chunk size never changes the factors beyond float64 rounding of the sums.
Sampled labels come from counter-based uniforms keyed by (seed, example, position), so they
do not depend on chunking either. Damping ``"heuristic"`` is kronfluence's default:
``lam = 0.1 x mean(Lam)`` per layer (and per other parameter tensor).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from etda import batch
from etda.features.capture import Captured, Layer, capture, set_example_index
from etda.io import atomic_write
from etda.seeding import uniform

CURVATURES = ("kfac", "ekfac")
FISHERS = ("sampled", "empirical")
HEURISTIC = 0.1  # kronfluence's damping: 0.1 x the mean eigenvalue
_LABEL_KEY = 0x5EED_F15E  # keeps the label draws apart from every other seeded stream


@dataclass(frozen=True)
class CurvatureSpec:
    """Which curvature to fit. ``kind``: ``"kfac"`` | ``"ekfac"``; ``fisher``: labels drawn
    from the model (``"sampled"``, the true Fisher) or the true labels (``"empirical"``);
    ``damping``: ``"heuristic"`` (0.1 x mean eigenvalue per layer), ``"trace:C"`` (C x the
    mean eigenvalue per layer) or a number ``>= 0`` added to every eigenvalue; ``seed``: of
    the sampled labels."""

    kind: str = "ekfac"
    fisher: str = "sampled"
    damping: float | str = "heuristic"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CURVATURES:
            raise ValueError(f"unknown curvature {self.kind!r}; choose from gram, kfac, ekfac")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be 'sampled' or 'empirical', got {self.fisher!r}")
        if _relative(self.damping) is None and not _nonnegative(self.damping):
            raise ValueError(
                "curvature damping must be 'heuristic', 'trace:C' (C x the mean eigenvalue per "
                f"layer, C >= 0) or a number >= 0, got {self.damping!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerCurvature:
    """One layer's fitted curvature: eigenbases ``q_s (o, o)``, ``q_a (i, i)`` and the
    elementwise preconditioner ``scale = (Lam + lam)^-1/2`` of shape ``(o, i)``."""

    q_s: Tensor
    q_a: Tensor
    eigenvalues: Tensor
    lam: float

    @property
    def scale(self) -> Tensor:
        return (self.eigenvalues + self.lam).clamp_min(1e-300).rsqrt()


@dataclass
class Preconditioner:
    """A member's fitted curvature, applied to captured gradients by the featurizer."""

    spec: CurvatureSpec
    layers: list[LayerCurvature]
    rest: dict[str, tuple[Tensor, float]] = field(default_factory=dict)  # diag Fisher, lam
    n_examples: int = 0

    def layer_features(self, j: int, d: Tensor, a: Tensor) -> Tensor:
        """Layer ``j``'s preconditioned per-example gradients ``(B, o * i)`` from its
        factors ``d (B, L, o)``, ``a (B, L, i)``."""
        lc = self.layers[j]
        dt = d.dtype
        dev = d.device
        q_s, q_a = lc.q_s.to(device=dev, dtype=dt), lc.q_a.to(device=dev, dtype=dt)
        rot = torch.einsum("blo,bli->boi", d @ q_s, a @ q_a)
        return (rot * lc.scale.to(device=dev, dtype=dt)).reshape(d.shape[0], -1)

    def rest_features(self, name: str, g: Tensor) -> Tensor:
        """Preconditioned per-example gradients ``(B, numel)`` of a parameter outside the
        hooked layers (diagonal Fisher)."""
        diag, lam = self.rest[name]
        scale = (diag + lam).clamp_min(1e-300).rsqrt().to(device=g.device, dtype=g.dtype)
        return g.reshape(g.shape[0], -1) * scale

    def info(self) -> dict:
        """What is recorded per member: the kind, Fisher, damping per layer."""
        return {
            **self.spec.to_dict(),
            "lam": [lc.lam for lc in self.layers] + [lam for _, lam in self.rest.values()],
            "n_fit": self.n_examples,
        }

    def dense(self) -> Tensor:
        """The curvature as one dense matrix over the featurizer's explicit layout (layers'
        ``(o, i)`` blocks row-major, then the rest): for tests on tiny models."""
        blocks = []
        for lc in self.layers:
            q = torch.kron(lc.q_s, lc.q_a)
            blocks.append(q @ torch.diag(lc.eigenvalues.reshape(-1)) @ q.T)
        blocks += [torch.diag(diag) for diag, _ in self.rest.values()]
        return torch.block_diag(*blocks)

    # ------------------------------------------------------------------ persistence

    def to_bytes(self, meta: dict) -> bytes:
        tensors: dict[str, Tensor] = {}
        for j, lc in enumerate(self.layers):
            tensors |= {f"{j}.q_s": lc.q_s, f"{j}.q_a": lc.q_a, f"{j}.eig": lc.eigenvalues}
        for name, (diag, _) in self.rest.items():
            tensors[f"rest.{name}"] = diag
        header = {
            "meta": meta,
            "lam": [lc.lam for lc in self.layers],
            "rest_lam": {n: lam for n, (_, lam) in self.rest.items()},
            "n": self.n_examples,
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        return save_tensors(tensors, metadata={"etda": json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, spec: CurvatureSpec, meta: dict) -> Preconditioner | None:
        """The saved preconditioner, or None when it was fitted for something else."""
        tensors = load_tensors(data)
        header = json.loads(_metadata(data)["etda"])
        if header["meta"] != json.loads(json.dumps(meta, sort_keys=True)):
            return None
        layers = [
            LayerCurvature(tensors[f"{j}.q_s"], tensors[f"{j}.q_a"], tensors[f"{j}.eig"], lam)
            for j, lam in enumerate(header["lam"])
        ]
        rest = {n: (tensors[f"rest.{n}"], lam) for n, lam in header["rest_lam"].items()}
        return cls(spec, layers, rest, int(header["n"]))


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


# ---------------------------------------------------------------------------- fitting


@dataclass
class FitInputs:
    """What a fit reads: the member's model and task, its hooked layers and other attributed
    parameters, the training inputs/targets, the chunk size and the input dtype."""

    model: nn.Module
    task: Any
    layers: list[Layer]
    rest: list[str]
    x: Tensor
    y: Tensor
    chunk_size: int
    dtype: torch.dtype
    progress: Callable[[int], None] | None = None


def fit(
    spec: CurvatureSpec, inputs: FitInputs, checkpoint: Path | None = None, key: str = ""
) -> Preconditioner:
    """Fit the curvature of one member (see the module doc). With ``checkpoint`` (a folder),
    the running sums are saved there after every chunk and a rerun with the same ``key`` (what
    the fit depends on) continues from them: an interrupted fit resumes, and the result
    equals an uninterrupted fit bit for bit."""
    covs = _Sums(checkpoint, "covariances", key)
    for _, hi, cap, _ in _chunks(spec, inputs, covs.done):
        for j, (d, a) in enumerate(cap.factors):
            d64, a64 = d.to("cpu", torch.float64), a.to("cpu", torch.float64)  # sums on host
            covs.add(f"s{j}", torch.einsum("blo,blp->op", d64, d64))
            covs.add(f"a{j}", torch.einsum("bli,blk->ik", a64, a64))
            covs.add(f"t{j}", torch.tensor(float(a.shape[0] * a.shape[1]), dtype=torch.float64))
        for name, g in cap.rest.items():
            g64 = g.reshape(g.shape[0], -1).to("cpu", torch.float64)
            covs.add(f"r.{name}", g64.pow(2).sum(0))
        covs.step(hi)
    n = batch.n_rows(inputs.x)
    bases = []
    for j in range(len(inputs.layers)):
        s_val, q_s = torch.linalg.eigh(covs[f"s{j}"] / n)
        a_val, q_a = torch.linalg.eigh(covs[f"a{j}"] / float(covs[f"t{j}"]))
        bases.append((q_s, q_a, torch.outer(s_val.clamp_min(0), a_val.clamp_min(0))))
    if spec.kind == "ekfac":
        bases = _refit_eigenvalues(spec, inputs, bases, checkpoint, key)
    layers = [
        LayerCurvature(q_s, q_a, lam_ij, _damping(spec, lam_ij)) for q_s, q_a, lam_ij in bases
    ]
    rest = {}
    for name in inputs.rest:
        diag = covs[f"r.{name}"] / n
        rest[name] = (diag, _damping(spec, diag))
    covs.finish()
    return Preconditioner(spec, layers, rest, n)


def _refit_eigenvalues(
    spec: CurvatureSpec, inputs: FitInputs, bases: list, checkpoint: Path | None, key: str
) -> list:
    """EK-FAC: the eigenvalues ``E[(Q_S^T G Q_A)^2]`` of the gradients in the K-FAC bases."""
    sums = _Sums(checkpoint, "eigenvalues", key)
    for _, hi, cap, _ in _chunks(spec, inputs, sums.done):
        for j, (d, a) in enumerate(cap.factors):
            q_s, q_a, _ = bases[j]
            d64, a64 = d.to("cpu", torch.float64), a.to("cpu", torch.float64)
            rot = torch.einsum("blo,bli->boi", d64 @ q_s, a64 @ q_a)
            sums.add(f"e{j}", rot.pow(2).sum(0))
        sums.step(hi)
    n = batch.n_rows(inputs.x)
    out = [(q_s, q_a, sums[f"e{j}"] / n) for j, (q_s, q_a, _) in enumerate(bases)]
    sums.finish()
    return out


def _nonnegative(d: Any) -> bool:
    return isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) and d >= 0


def _relative(d: Any) -> float | None:
    """The factor C of a damping relative to the mean eigenvalue (``"heuristic"``: 0.1,
    ``"trace:C"``: C), or None for an absolute damping."""
    if d == "heuristic":
        return HEURISTIC
    if isinstance(d, str) and d.startswith("trace:"):
        try:
            c = float(d.split(":", 1)[1])
        except ValueError:
            return None
        return c if math.isfinite(c) and c >= 0 else None
    return None


def _damping(spec: CurvatureSpec, eigenvalues: Tensor) -> float:
    c = _relative(spec.damping)
    if c is not None:
        return c * float(eigenvalues.mean()) if eigenvalues.numel() else 0.0
    return float(spec.damping)


def _chunks(
    spec: CurvatureSpec, inputs: FitInputs, start: int
) -> Iterator[tuple[int, int, Captured, Tensor]]:
    """Captured loss gradients of the training set, chunk by chunk from row ``start``, at the
    labels the Fisher asks for (sampled from the model, or the true ones)."""
    model, task, x, y = inputs.model, inputs.task, inputs.x, inputs.y
    n = batch.n_rows(x)
    p = next(model.parameters())
    for lo in range(start, n, inputs.chunk_size):
        hi = min(lo + inputs.chunk_size, n)
        index = torch.arange(lo, hi)
        set_example_index(model, index)
        xb = batch.cast(batch.take(x, lo, hi), inputs.dtype, p.device)
        labels = y[lo:hi].to(p.device)
        if spec.fisher == "sampled":
            labels = sample_labels(model, task, xb, labels, index, spec.seed)
        cap = capture(model, task, "loss", xb, labels, inputs.layers, inputs.rest)
        if inputs.progress is not None:
            inputs.progress(hi - lo)
        yield lo, hi, cap, labels


def sample_labels(
    model: nn.Module, task: Any, x: Tensor, y: Tensor, index: Tensor, seed: int
) -> Tensor:
    """Labels drawn from the model's predictive distribution for examples ``index``, from
    uniforms keyed by (seed, example, position): the same labels whatever the chunking."""
    sample = getattr(task, "sample", None)
    if sample is None:
        raise ValueError(
            f"task {getattr(task, 'name', type(task).__name__)!r} cannot sample labels from the "
            "model (no sample(out, u) method); use fisher='empirical' (the true labels)"
        )
    with torch.no_grad():
        out = batch.run_model(model, x, task)
    positions = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
    keys = index.numpy()[:, None] * positions + np.arange(positions)[None, :]
    u = torch.from_numpy(uniform(_LABEL_KEY, seed, keys)).reshape(y.shape).to(out.device)
    labels = sample(out, u)
    if y.ndim > 1:  # padding stays padding: those positions count nowhere
        labels = torch.where(y == -100, y, labels)
    return labels


class _Sums:
    """Running float64 sums over chunks, optionally checkpointed to a safetensors file so
    that an interrupted fit continues from the last finished chunk."""

    def __init__(self, folder: Path | None, stage: str, key: str) -> None:
        self.path = None if folder is None else folder / f"curvature-{stage}.partial"
        self.key = key
        self.sums: dict[str, Tensor] = {}
        self.done = 0
        if self.path is not None and self.path.exists():
            data = self.path.read_bytes()
            try:
                meta = _metadata(data)
                if meta.get("key") == key:  # sums of another fit are not resumed
                    self.sums, self.done = dict(load_tensors(data)), int(meta["done"])
            except (ValueError, KeyError, OSError):  # a damaged partial file: start over
                self.sums, self.done = {}, 0

    def add(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def __getitem__(self, key: str) -> Tensor:
        return self.sums[key]

    def step(self, done: int) -> None:
        self.done = done
        if self.path is not None:
            data = save_tensors(
                {k: v.contiguous() for k, v in self.sums.items()},
                metadata={"done": str(done), "key": self.key},
            )
            atomic_write(self.path, data)

    def finish(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
