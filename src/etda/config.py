"""``AttributeConfig``: every option of an attribution run, documented and validated once.

``etda.attribute(models, train=, test=, method=, ensemble=, **options)`` splits its keyword
options into the fields of this config and the method's own options (``damping``,
``solver``, ...). The config is frozen; :func:`etda.engine.resolve` turns it into a plan by
making every automatic choice (projection, chunk size, in memory or out of core, store)
once, and ``Scores.config["options"]`` records :meth:`AttributeConfig.to_dict`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from etda.io import parse_size

DTYPES = ("float32", "float64")
PROJECTION_CHOICES = ("auto", "none", "identity", "gaussian", "rademacher", "sparse", "factored")
STORAGE_CHOICES = ("float32", "float16", "bfloat16")
KERNEL_DTYPES = ("float64", "float32", "bfloat16")
SOLVE_DTYPES = ("float64", "float32")
EXECUTOR_CHOICES = ("inprocess", "process", "ray")


def _help(text: str, default: Any = MISSING, **kw: Any) -> Any:
    if default is MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class AttributeConfig:
    """How one attribution runs (``help`` of each field: ``AttributeConfig.help()``)."""

    proj_dim: int | None = _help(
        "Projection dimension k. None with projection='auto': the exact gradient kernel "
        "while n_train fits memory_budget, else a factored sketch with k = 2048.",
        None,
    )
    projection: str = _help(
        "Featurizer: auto | none (exact kernel) | identity (exact flat gradients) | gaussian | "
        "rademacher | sparse (count sketch) | factored (TensorSketch of layer outer products).",
        "auto",
    )
    seed: int = _help("Seed of every projection, mask and adapter (recorded with the scores).", 0)
    params: Any = _help(
        "Attributed parameters: 'all', 'adapters' (LoRA), a list of names or prefixes, or a "
        "predicate on names.",
        "all",
    )
    task: Any = _help(
        "What is attributed (an etda.task object); None: classification for labels (B,), "
        "the sequence task for next-token targets (B, T).",
        None,
    )
    dtype: str = _help("Compute dtype of features and models: float32 | float64.", "float32")
    chunk_size: int | None = _help(
        "Examples per featurizer call and per stored chunk (None: from the memory budget).", None
    )
    memory_budget: int = _help(
        "Bytes the process may hold, e.g. '2GB'; beyond it scoring goes out of core.",
        2 * 1024**3,
    )
    store: Any = _help(
        "Feature store: a directory (persistent, resumable, validated) or None (in memory; a "
        "temporary directory when out of core or on worker processes).",
        None,
    )
    checkpoints: Sequence | None = _help(
        "TracIn: checkpoint state dicts of the model (a list per model for several models).",
        None,
    )
    checkpoint_lrs: Sequence[float] | None = _help(
        "TracIn: the learning-rate weight of each checkpoint (default 1 each).", None
    )
    train_seconds: float = _help(
        "Training time of the given models, added to the reported training cost.", 0.0
    )
    progress: bool = _help("Progress bars on stderr.", False)
    use_hooks: bool = _help(
        "Per-example gradients of Linear/Conv layers from one backward pass with hooks (False: "
        "vmap for every parameter; a reference for tests).",
        True,
    )
    storage: str = _help("Precision of stored features: float32 | float16 | bfloat16.", "float32")
    out_of_core: bool | None = _help(
        "Score block by block from stored features (None: when the dense path would not fit "
        "memory_budget, or scores_out is given).",
        None,
    )
    scores_out: str | Path | None = _help(
        "Write the (n_test, n_train) float32 scores to this .npy file block by block.", None
    )
    top_k: int = _help("Proponents/opponents kept per test example when out of core.", 10)
    executor: str = _help(
        "Where members and training shards are featurized: inprocess | process | ray.",
        "inprocess",
    )
    workers: int | None = _help("Featurization workers (None: one per core).", None)
    address: str | None = _help("Ray cluster to join (executor='ray'), e.g. 'auto'.", None)
    repair: bool = _help(
        "Resume a store whose recorded rows fail their checksum by recomputing only those "
        "ranges (False: refuse such a store with CorruptStoreError).",
        False,
    )
    kernel_dtype: str = _help(
        "Precision of the kernel's matrix products (gradient Grams, exact or projected): "
        "float64, float32 (about twice as fast on CPUs) or bfloat16 (for GPUs); each "
        "layer's product is summed in float64, except the float32 training kernel with "
        "itself: its symmetric products on one triangle (BLAS syrk), summed in float32.",
        "float64",
    )
    solve_dtype: str = _help(
        "Precision of the damped system's Cholesky factorization and solves: float64, or "
        "float32 (LAPACK spotrf/spotrs; with kernel_dtype='float32' the fastest exact path, "
        "its n x n kernel kept in float32). Results come back in float64 either way.",
        "float64",
    )
    device: str | None = _help(
        "Where models run: 'cpu', 'cuda', 'cuda:1', ... (None: the models' own device). Inputs "
        "are moved chunk by chunk; features come back to the host for the store and scoring.",
        None,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", _budget(self.memory_budget))
        _choice("projection", self.projection, PROJECTION_CHOICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("storage", self.storage, STORAGE_CHOICES)
        _choice("kernel_dtype", self.kernel_dtype, KERNEL_DTYPES)
        _choice("solve_dtype", self.solve_dtype, SOLVE_DTYPES)
        _choice("executor", self.executor, EXECUTOR_CHOICES)
        _optional_positive_int("proj_dim", self.proj_dim)
        if self.proj_dim is not None and self.projection in ("none", "identity"):
            raise ValueError(
                f"proj_dim={self.proj_dim} has no effect with projection={self.projection!r} "
                "(exact, unprojected gradients); drop proj_dim, or choose a projection that "
                "uses it: gaussian, rademacher, sparse, factored or auto"
            )
        _optional_positive_int(
            "chunk_size", self.chunk_size, "a positive integer (examples per call)"
        )
        _optional_positive_int("workers", self.workers)
        if self.device is not None:
            _device_or_error(self.device)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.train_seconds, int | float) and self.train_seconds >= 0):
            raise ValueError(f"train_seconds must be a number >= 0, got {self.train_seconds!r}")
        if not isinstance(self.repair, bool):
            raise ValueError(f"repair must be True or False, got {self.repair!r}")
        if self.checkpoint_lrs is not None:
            lrs = list(self.checkpoint_lrs)
            bad = [v for v in lrs if not _finite_nonnegative(v)]
            if bad:
                raise ValueError(
                    f"checkpoint_lrs must be finite numbers >= 0 (learning-rate weights), got {bad}"
                )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> its help text."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: objects are recorded by what identifies them."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "task":
                v = getattr(v, "name", type(v).__name__) if v is not None else None
            elif f.name == "store":
                v = None if v is None else str(getattr(v, "root", v))
            elif f.name == "checkpoints":
                v = None if v is None else len(v)
            elif f.name == "params" and callable(v):
                v = getattr(v, "__name__", "predicate")
            elif f.name == "params" and not isinstance(v, str):
                v = list(v)
            elif f.name == "checkpoint_lrs" and v is not None:
                v = [float(x) for x in v]
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return out


def _budget(value: Any) -> int:
    try:
        n = parse_size(value)
    except (ValueError, TypeError):
        raise ValueError(
            f"memory_budget must be a positive size such as '2GB' or a number of bytes, got "
            f"{value!r}"
        ) from None
    return n


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: {name} must be one of {', '.join(choices)}")


def _optional_positive_int(name: str, value: Any, what: str = "a positive integer") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _device_or_error(device: Any) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be e.g. 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda is not None}); use "
            "device='cpu' or install a CUDA build of torch"
        )


def _finite_nonnegative(v: Any) -> bool:
    # numbers.Real: Python and NumPy scalars (np.float32 learning rates are fine)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    return ok and math.isfinite(v) and v >= 0
