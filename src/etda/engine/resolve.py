"""``resolve``: a config, models, data, a method and an ensemble -> a :class:`RunPlan`.

Every automatic choice of a run is made here, once: the task, the projection, the chunk size,
in memory or out of core, the feature store, and the featurization service every member
uses. The run itself (:mod:`etda.engine.loop`) only executes the plan.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from etda import batch, compat
from etda.config import AttributeConfig
from etda.cost import forward_flops
from etda.engine.memory import DEFAULT_SKETCH_DIM, MemoryModel
from etda.engine.scorers import BlockedScorer, DenseScorer, SharedKernelScorer
from etda.ensemble.base import BuildContext, Ensemble, Independent
from etda.features import blocks as fb
from etda.features.featurize import FeatureSpec, Featurizer
from etda.features.service import TEST_INDEX_OFFSET, FeatureService, Split
from etda.features.store import FeatureStore
from etda.methods.base import Method
from etda.sources import as_source
from etda.task import Task, check_task, default_task, select_parameters


@dataclass
class RunPlan:
    """Everything a run needs, decided (see the module doc)."""

    config: AttributeConfig
    method: Method
    ensemble: Ensemble
    models: list[nn.Module]
    task: Task
    train: Split
    test: Split
    projection: str
    chunk_size: int
    out_of_core: bool
    memory: MemoryModel
    service: FeatureService
    stream_rows: int
    mode: str = "attribute"  # "attribute" | "self" (self-influence: the diagonal only)
    tmp_store: Any = field(default=None, repr=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    @property
    def proj_dim(self) -> int | None:
        return self.config.proj_dim if self.projection not in ("none", "identity") else None

    @property
    def parallel(self) -> bool:
        return self.config.executor != "inprocess"

    def scorer(self) -> DenseScorer | BlockedScorer | SharedKernelScorer:
        if self.method.shared_solve and self.mode == "attribute":
            return SharedKernelScorer(self.method)
        if self.out_of_core and self.mode == "attribute":
            c = self.config
            return BlockedScorer(
                self.method.combine,
                self.memory,
                self.torch_dtype,
                c.scores_out,
                c.top_k,
                c.progress,
            )
        return DenseScorer(self.method.combine)

    def build_context(self) -> BuildContext:
        c = self.config
        return BuildContext(
            self.train.x, self.train.y, self.task, c.seed, self.torch_dtype, c.progress
        )

    def checkpoints_of(self, member: Any) -> list | None:
        """The checkpoints a member expands into: its own, else the run's (per model)."""
        if member.checkpoints is not None:
            return member.checkpoints
        ck = self.config.checkpoints
        if ck is None:
            return None
        nested = bool(ck) and isinstance(ck[0], list | tuple)
        ck = list(ck[member.model_index] if nested else ck)
        lrs = self.config.checkpoint_lrs
        lrs = list(lrs) if lrs is not None else [1.0] * len(ck)
        if len(lrs) != len(ck):
            raise ValueError(f"{len(ck)} checkpoints but {len(lrs)} checkpoint_lrs")
        return list(zip(ck, lrs, strict=True))

    def cleanup(self) -> None:
        if self.tmp_store is not None:
            self.tmp_store.cleanup()
            self.tmp_store = None


def resolve(
    config: AttributeConfig,
    models: nn.Module | list[nn.Module],
    train: object,
    test: object,
    method: Method,
    ensemble: Ensemble | None,
    mode: str = "attribute",
) -> RunPlan:
    """Make every automatic decision of a run (see the module doc)."""
    models, ensemble = _checked(models, ensemble)
    if config.device is not None:  # copies: the user's models stay where they are
        models = [_on(m, config.device) for m in models]
    x_train, y_train = as_source(train, "train")
    x_test, y_test = as_source(test, "test")
    task = config.task or default_task(y_train)
    check_task(task)
    for m in models:
        _probe(m, task, x_train, y_train, "train")
        _probe(m, task, x_test, y_test, "test")
    compat.check(method, ensemble, config.checkpoints)
    memory = MemoryModel(config.memory_budget)
    n_train, n_test = batch.n_rows(x_train), batch.n_rows(x_test)
    projection = _projection(config, method, memory, models[0], task, x_train, y_train, n_test)
    n_params = max(sum(p.numel() for p in m.parameters()) for m in models)
    torch_dtype = getattr(torch, config.dtype)
    chunk_size = config.chunk_size or memory.chunk_size(n_params, torch_dtype.itemsize)
    out_of_core = config.out_of_core
    explicit = method.curvature(config.seed) is not None  # preconditioned: explicit rows
    if out_of_core is None:
        width = n_params if explicit and projection in ("none", "identity") else config.proj_dim
        out_of_core = config.scores_out is not None or (
            (projection != "none" or explicit) and not memory.dense_fits(n_train, n_test, width)
        )
    if out_of_core:
        compat.check_out_of_core(method, projection, explicit_rows=explicit)
    store, tmp = _open_store(config, bool(out_of_core))
    probe_model = copy.deepcopy(models[0]).eval()
    service = FeatureService(
        task,
        Split("train", x_train, y_train, 0),
        Split("test", x_test, y_test, TEST_INDEX_OFFSET),
        store,
        projection=projection,
        proj_dim=config.proj_dim or DEFAULT_SKETCH_DIM,
        target=method.target,
        dtype=config.dtype,
        chunk_size=chunk_size,
        storage=config.storage,
        params=config.params,
        use_hooks=config.use_hooks,
        progress=config.progress,
        fwd_flops=forward_flops(
            lambda: batch.run_model(probe_model, _first(x_train, 1, probe_model), task)
        ),
        curvature=method.curvature(config.seed),
        test_target=method.test_target,
        kernel_dtype=config.kernel_dtype,
        solve_dtype=config.solve_dtype,
    )
    return RunPlan(
        config,
        method,
        ensemble,
        models,
        task,
        service.train,
        service.test,
        projection,
        chunk_size,
        bool(out_of_core),
        memory,
        service,
        memory.stream_rows(n_params if explicit and projection == "none" else config.proj_dim),
        mode,
        tmp,
    )


def _checked(
    models: nn.Module | list[nn.Module], ensemble: Ensemble | None
) -> tuple[list[nn.Module], Ensemble]:
    """The models as a list and the ensemble (``None``: independent), or a TypeError."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a torch.nn.Module or a non-empty list of them")
    ensemble = Independent() if ensemble is None else ensemble
    if not isinstance(ensemble, Ensemble):
        got = (
            f"the class {ensemble.__name__} (pass an instance: {ensemble.__name__}(...))"
            if isinstance(ensemble, type)
            else f"{type(ensemble).__name__} {ensemble!r:.60}"
        )
        raise TypeError(
            f"ensemble must be an etda ensemble (etda.Dropout(...), etda.LoRA(...), ...) or "
            f"None, got {got}"
        )
    return models, ensemble


def _open_store(
    config: AttributeConfig, out_of_core: bool
) -> tuple[FeatureStore, tempfile.TemporaryDirectory | None]:
    """The run's feature store: the user's, or a temporary folder when features must go to
    disk (out of core, or featurized on workers) and none was given; in memory otherwise."""
    store = config.store
    if config.executor != "inprocess" and isinstance(store, FeatureStore) and store.root is None:
        raise ValueError(
            f"executor {config.executor!r} writes features to disk: pass a store directory"
        )
    tmp = None
    if (out_of_core or config.executor != "inprocess") and store is None:
        tmp = tempfile.TemporaryDirectory(prefix="etda-features-")
        store = tmp.name
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store)
    if config.repair and not store.repair:
        store = FeatureStore(store.root, repair=True, lock_timeout=store.lock_timeout)
    return store, tmp


def _first(x: batch.Inputs, k: int, model: nn.Module) -> batch.Inputs:
    """The first ``k`` examples, cast and moved for ``model``."""
    p = next(model.parameters())
    return batch.cast(batch.take(x, 0, k), p.dtype, p.device)


def _on(model: nn.Module, device: str) -> nn.Module:
    p = next(model.parameters(), None)
    if p is not None and p.device == torch.device(device):
        return model
    return copy.deepcopy(model).to(device)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _projection(
    config: AttributeConfig,
    method: Method,
    memory: MemoryModel,
    model: nn.Module,
    task: Task,
    x: Tensor,
    y: Tensor,
    n_test: int,
) -> str:
    """``projection="auto"``: the method's default, else the exact kernel while ``n_train``
    fits (and its exact features do), else a factored sketch."""
    projection = config.projection
    if projection == "auto":
        projection = method.default_projection
    if projection != "auto":
        return projection
    if method.curvature(config.seed) is not None:
        # Preconditioned gradients are explicit rows: exact ("none"), streamed from the store
        # out of core when they do not fit; a sketch only when proj_dim asks for one (sketches
        # of preconditioned gradients lose much of the curvature's gain).
        return "none" if config.proj_dim is None else "factored"
    if config.proj_dim is not None or not memory.exact_kernel_fits(batch.n_rows(x)):
        return "factored"
    width = _exact_width(model, task, config, x, y)
    if width is not None and not memory.exact_features_fit(width, batch.n_rows(x) + n_test):
        return "factored"  # e.g. token models: every layer sees T positions
    return "none"


def _exact_width(
    model: nn.Module, task: Task, config: AttributeConfig, x: Tensor, y: Tensor
) -> int | None:
    """Width of one example's exact features (None: decided later, e.g. adapters requested on
    a model that has none yet)."""
    m = copy.deepcopy(model).eval()
    names = select_parameters(m, config.params if config.params != "all" else "all")
    probe = (_first(x, 1, m), y[:1])
    try:
        widths = Featurizer(m, task, names, FeatureSpec("none"), probe).widths()
    except ValueError:
        return None
    return sum(w for k, w in widths.items() if k not in fb.EXTRA)


def _probe(model: nn.Module, task: Task, x: Tensor, y: Tensor, name: str) -> None:
    was_training = model.training
    model.eval()  # a probe must not update BatchNorm statistics of the user's model
    try:
        with torch.no_grad():
            out = batch.run_model(model, _first(x, 2, model), task)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"the model cannot process the {name} inputs of shape {batch.describe(x)}: {e}"
        ) from e
    finally:
        model.train(was_training)
    try:
        out = out.cpu()
        task.check(out, y[:2])
        task.check(out[:1].expand(y.shape[0], *out.shape[1:]), y)
    except ValueError as e:
        raise ValueError(f"{name} set does not match the model: {e}") from e
