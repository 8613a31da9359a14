"""The one-call API: ``etda.attribute(models, train=, test=, method=, ensemble=) -> Scores``.

For each ensemble member: featurize the training set, featurize the test set, score;
then combine members (TRAK: kernel term and Q averaged separately; others: mean).
Members are built, featurized and scored one at a time.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from etda import __version__
from etda.cost import Costs, forward_flops, parse_bytes, timer, weights_bytes
from etda.ensemble import BuildContext, Ensemble, Independent, Member, set_example_index
from etda.features import blocks as fb
from etda.features.distributed import featurize_parallel
from etda.features.featurize import FeatureSpec, Featurizer, NonFiniteError, check_finite
from etda.features.store import STORAGE, FeatureStore, SplitStore
from etda.methods import Combiner, MemberContext, MemberResult, Method, get_method
from etda.outofcore import MemberFactors, rss_bytes, score_blocked
from etda.parallel import EXECUTORS
from etda.scores import Scores
from etda.task import ClassificationTask, ParamSelector, SequenceTask, Task, select_parameters

TEST_INDEX_OFFSET = 1 << 40  # test examples get their own keys for per-example masks


def as_tensors(data: object, name: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors/arrays or a Dataset yielding ``(x, y)``."""
    if isinstance(data, Dataset) and not isinstance(data, tuple | list):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not items:
            raise ValueError(f"{name} set is empty")
        x = torch.stack([torch.as_tensor(i[0]) for i in items])
        y = torch.stack([torch.as_tensor(i[1]) for i in items])
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = (torch.as_tensor(np.asarray(d) if not isinstance(d, Tensor) else d) for d in data)
    else:
        raise TypeError(f"{name} must be (x, y) tensors or a torch Dataset of (x, y) pairs")
    if x.shape[0] == 0:
        raise ValueError(f"{name} set is empty")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:10, 0].tolist()
        raise NonFiniteError(f"{name} inputs contain NaN/inf at example index {bad}")
    if y.is_floating_point():
        raise ValueError(f"{name} labels must be integers, got {y.dtype}")
    return x, y.long()


def default_task(y: Tensor) -> Task:
    return SequenceTask() if y.ndim == 2 else ClassificationTask()


def fingerprint(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for n, t in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for m in model.modules():  # masks and adapters change the function, not just weights
        if m is not model and not list(m.children()):
            h.update(m.extra_repr().encode())
    return h.hexdigest()[:24]


def _resolve_projection(projection: str, proj_dim: int | None, n_train: int, budget: int) -> str:
    if projection != "auto":
        return projection
    if proj_dim is not None:
        return "factored"
    # Exact sample-space kernel while a few n x n float64 matrices fit the budget.
    return "none" if 4 * 8 * n_train**2 <= budget else "factored"


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Floating inputs follow the model's dtype; integer inputs (tokens) stay as they are."""
    return x.to(dtype) if x.is_floating_point() else x


def _exact_features_fit(
    model: nn.Module, task: Task, params: ParamSelector, x: Tensor, y: Tensor, n: int, budget: int
) -> bool:
    """Whether exact (unprojected) features of ``n`` examples fit half the memory budget."""
    m = copy.deepcopy(model).eval()
    names = select_parameters(m, params if params != "all" else "all")
    probe = (_cast(x[:1], next(m.parameters()).dtype), y[:1])
    try:
        widths = Featurizer(m, task, names, FeatureSpec("none"), probe).widths()
    except ValueError:  # e.g. adapters requested on a model without them: decided later
        return True
    width = sum(w for k, w in widths.items() if k not in fb.EXTRA)
    return 4 * n * width <= budget // 2


def _probe(model: nn.Module, task: Task, x: Tensor, y: Tensor, name: str) -> None:
    was_training = model.training
    model.eval()  # a probe must not update BatchNorm statistics of the user's model
    try:
        with torch.no_grad():
            out = model(_cast(x[:2], next(model.parameters()).dtype))
    except RuntimeError as e:
        raise ValueError(
            f"the model cannot process the {name} inputs of shape {tuple(x.shape[1:])}: {e}"
        ) from e
    finally:
        model.train(was_training)
    try:
        task.check(out, y[:2])
        task.check(out[:1].expand(y.shape[0], *out.shape[1:]), y)
    except ValueError as e:
        raise ValueError(f"{name} set does not match the model: {e}") from e


def _load_checkpoint(model: nn.Module, state: dict | nn.Module) -> nn.Module:
    state = state.state_dict() if isinstance(state, nn.Module) else state
    m = copy.deepcopy(model)
    names = {n for n, _ in m.named_parameters()}
    missing = sorted(names - set(state))
    if missing:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}")
    try:
        m.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not match the model: {e}") from e
    return m.to(next(model.parameters()).dtype)


def compute_rows(
    model: nn.Module,
    fz: Featurizer,
    x: Tensor,
    y: Tensor,
    lo: int,
    hi: int,
    offset: int,
    dtype: torch.dtype,
    what: str,
) -> dict[str, Tensor]:
    """Feature blocks of examples ``[lo, hi)`` (per-example masks keyed by ``offset + i``)."""
    index = torch.arange(lo, hi) + offset
    set_example_index(model, index)
    blocks = fz(_cast(x[lo:hi], dtype), y[lo:hi])
    check_finite(blocks, index - offset, what)
    return blocks


class _Run:
    """State of one attribution run (kept out of the public signature)."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)

    def spec(self, member: Member) -> FeatureSpec:
        return FeatureSpec(
            self.projection, self.proj_dim, member.projection_seed, self.method.target, self.dtype
        )

    def member_featurizer(self, member: Member, model: nn.Module) -> tuple[Featurizer, dict]:
        """The member's featurizer and the metadata its stores are validated against."""
        params = select_parameters(model, self.params if member.params == "all" else member.params)
        spec = self.spec(member)
        fz = Featurizer(
            model, self.task, params, spec, (self.x_train, self.y_train), use_hooks=self.use_hooks
        )
        meta = {
            "etda_version": __version__,
            "weights": model_fingerprint(model),
            "params": hashlib.sha256("|".join(params).encode()).hexdigest()[:16],
            "spec": spec.to_dict(),
            "task": self.task.name,
            "hooks": self.use_hooks,
        }
        return fz, meta

    def open_split(
        self, fz: Featurizer, meta: dict, tag: str, split: str
    ) -> tuple[SplitStore, Tensor, Tensor, int]:
        """Open (resume, validate) the store of one split: ``(store, x, y, index offset)``."""
        x, y, offset = (
            (self.x_train, self.y_train, 0)
            if split == "train"
            else (self.x_test, self.y_test, TEST_INDEX_OFFSET)
        )
        st = self.store.split(
            tag,
            split,
            {**meta, "data": fingerprint(x, y)},
            x.shape[0],
            fz.widths(),
            fz.spec.torch_dtype,
            self.storage,
        )
        return st, x, y, offset

    def featurize(
        self, member: Member, model: nn.Module, tag: str, costs: Costs, load_train: bool = True
    ) -> tuple[dict | SplitStore, dict, Featurizer]:
        """Fill the member's stores (only missing rows); the train features come back
        loaded, or as the store itself (``load_train=False``: out-of-core scoring)."""
        fz, meta = self.member_featurizer(member, model)
        out: list = []
        for split in ("train", "test"):
            with timer(costs, f"featurize_{split}_s"):
                st, x, y, offset = self.open_split(fz, meta, tag, split)
                self._fill(st, fz, model, x, y, offset, f"{tag} {split}")
                out.append(st if split == "train" and not load_train else st.load())
            costs.feature_bytes += st.feature_nbytes()
        n = self.x_train.shape[0] + self.x_test.shape[0]
        costs.flops += 3 * self.fwd_flops * n
        return out[0], out[1], fz

    def _fill(
        self,
        st: SplitStore,
        fz: Featurizer,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        offset: int,
        what: str,
    ) -> None:
        todo = list(st.missing(self.chunk_size))
        bar = tqdm(
            total=sum(hi - lo for lo, hi in todo),
            desc=what,
            unit="ex",
            leave=False,
            disable=not self.progress,
        )
        for lo, hi in todo:
            st.write(lo, hi, compute_rows(model, fz, x, y, lo, hi, offset, self.torch_dtype, what))
            bar.update(hi - lo)
        bar.close()

    def q_term(self, model: nn.Module) -> Tensor:
        qs = []
        with torch.no_grad():
            for lo in range(0, self.x_train.shape[0], self.chunk_size):
                hi = min(lo + self.chunk_size, self.x_train.shape[0])
                set_example_index(model, torch.arange(lo, hi))
                out = model(_cast(self.x_train[lo:hi], self.torch_dtype))
                qs.append(self.task.q(out, self.y_train[lo:hi]))
        return torch.cat(qs).to(torch.float64)


def attribute(
    models: nn.Module | Sequence[nn.Module],
    train: object,
    test: object,
    method: str | Method = "trak",
    ensemble: Ensemble | None = None,
    *,
    proj_dim: int | None = None,
    projection: str = "auto",
    seed: int = 0,
    params: ParamSelector = "all",
    task: Task | None = None,
    dtype: str = "float32",
    chunk_size: int | None = None,
    memory_budget: str | int = "2GB",
    store: str | Path | FeatureStore | None = None,
    checkpoints: Sequence | None = None,
    checkpoint_lrs: Sequence[float] | None = None,
    train_seconds: float = 0.0,
    progress: bool = False,
    use_hooks: bool = True,
    storage: str = "float32",
    out_of_core: bool | None = None,
    scores_out: str | Path | None = None,
    top_k: int = 10,
    executor: str = "inprocess",
    workers: int | None = None,
    address: str | None = None,
    **method_options: object,
) -> Scores:
    """Attribute the test predictions of ``models`` to the training examples.

    Returns :class:`etda.Scores` whose ``values`` have shape ``(n_test, n_train)``;
    positive means the training example helps the test prediction.

    ``models``: one trained module or a list (an independent ensemble, or the K models of
    a K x M hybrid when ``ensemble`` is given). ``train``/``test``: ``(x, y)`` or a Dataset.
    ``method``: ``graddot | gradcos | tracin | if | trak``; its options (``damping``,
    ``solver``, ...) go in ``method_options``. ``proj_dim``/``projection``: ``"auto"``
    uses the exact sample-space kernel when ``n_train`` fits ``memory_budget`` and no
    ``proj_dim`` is given, else a factored TensorSketch. ``store``: a directory makes
    features persistent and resumable. ``checkpoints``/``checkpoint_lrs``: TracIn's
    checkpoints (per model) and learning-rate weights. ``train_seconds``: training time
    of the given models, added to the reported costs.

    Scale: ``memory_budget`` bounds the process's memory. When the dense scores or features
    would not fit it (or ``out_of_core=True``, or ``scores_out`` is given) the run scores out
    of core (``etda.outofcore``): features on disk, scores in blocks of training columns,
    written to ``scores_out`` (an ``.npy`` file, memory-mapped into ``Scores.values``) when
    they do not fit, with the ``top_k`` proponents/opponents per test example in
    ``Scores.topk`` (and ``Scores.top()``). ``storage``: ``float32 | float16 | bfloat16``
    precision of stored features. ``executor``: ``inprocess | process | ray`` featurizes members and
    shards of the training set in parallel (``workers``; ``address`` joins a Ray cluster),
    with results identical to one process.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a torch.nn.Module or a non-empty list of them")
    m_obj = get_method(method, **method_options)
    x_train, y_train = as_tensors(train, "train")
    x_test, y_test = as_tensors(test, "test")
    task = task or default_task(y_train)
    for m in models:
        _probe(m, task, x_train, y_train, "train")
        _probe(m, task, x_test, y_test, "test")
    if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim <= 0):
        raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
    budget = parse_bytes(memory_budget)
    n_train = x_train.shape[0]
    if getattr(m_obj, "solver", None) == "cg" and projection == "auto":
        projection = "identity"
    auto = projection == "auto"
    projection = _resolve_projection(projection, proj_dim, n_train, budget)
    if (
        auto
        and projection == "none"
        and not _exact_features_fit(
            models[0], task, params, x_train, y_train, n_train + x_test.shape[0], budget
        )
    ):
        projection = "factored"  # e.g. token models: every layer sees T positions
    ensemble = ensemble or Independent()
    torch_dtype = getattr(torch, dtype)
    n_params = max(sum(p.numel() for p in m.parameters()) for m in models)
    if chunk_size is None:
        chunk_size = int(max(1, min(512, budget // (16 * n_params * torch_dtype.itemsize))))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if getattr(ensemble, "forward_only", False) and m_obj.combine != "trak":
        raise ValueError(
            f"Dropout(forward_only=True) changes only TRAK's Q term; method {m_obj.name!r} has "
            "none, so it would return single-model scores. Use forward_only=False."
        )
    if m_obj.uses_checkpoints and checkpoints is None and not isinstance(ensemble, _lora_type()):
        raise ValueError(f"method {m_obj.name!r} needs checkpoints=[...] (and checkpoint_lrs)")

    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor != "inprocess" and m_obj.uses_checkpoints:
        raise ValueError(f"method {m_obj.name!r} featurizes checkpoints in process only")
    n_test = x_test.shape[0]
    if out_of_core is None:
        # Out of core when the dense path would not fit what the budget leaves this process
        # (a budget below what the process already holds cannot be met either way: then the
        # dense path runs with the smallest chunks, as it always has).
        room = budget - rss_bytes()
        dense = _dense_need(n_train, n_test, proj_dim or 2048)
        out_of_core = scores_out is not None or (projection != "none" and 0 < room < dense)
    if out_of_core and projection == "none":
        raise ValueError(
            "out-of-core scoring needs projected features: the exact kernel is n x n; pass "
            "proj_dim=... (CLI --proj-dim) or projection='factored'"
        )
    if out_of_core and m_obj.uses_checkpoints:
        raise ValueError(f"method {m_obj.name!r} has no out-of-core form; raise memory_budget")
    if executor != "inprocess" and isinstance(store, FeatureStore) and store.root is None:
        raise ValueError(f"executor {executor!r} writes features to disk: pass a store directory")
    tmp_store = None
    if (out_of_core or executor != "inprocess") and store is None:
        tmp_store = tempfile.TemporaryDirectory(prefix="etda-features-")
        store = tmp_store.name

    run = _Run(
        method=m_obj,
        storage=storage,
        task=task,
        projection=projection,
        proj_dim=proj_dim or 2048,
        dtype=dtype,
        torch_dtype=torch_dtype,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        chunk_size=chunk_size,
        progress=progress,
        use_hooks=use_hooks,
        params=params,
        store=store if isinstance(store, FeatureStore) else FeatureStore(store),
        fwd_flops=forward_flops(
            copy.deepcopy(models[0]).eval(), _cast(x_train[:1], next(models[0].parameters()).dtype)
        ),
    )
    costs = Costs(train_s=float(train_seconds))
    costs.weights_bytes = sum(weights_bytes(m) for m in models)
    ctx = BuildContext(x_train, y_train, task, seed, torch_dtype, progress)
    combiner = Combiner(m_obj.combine)
    shared: dict[str, MemberResult | MemberFactors] = {}
    factors: list[MemberFactors] = []
    members_info = []
    t_start = time.perf_counter()
    total = ensemble.size(len(models))
    members_iter = ensemble.members(models, ctx)
    if executor != "inprocess":
        members_list = list(members_iter)  # built once: LoRA adapters train here
        featurize_parallel(run, members_list, costs, executor, workers, address)
        members_iter = iter(members_list)
    stream_rows = max(64, min(8192, budget // 16 // (12 * (proj_dim or 2048))))
    bar = tqdm(total=total, desc=f"{m_obj.name} members", unit="member", disable=not progress)
    for i, member in enumerate(members_iter):
        costs.train_s += member.train_s
        if member.extra_weight_names:
            costs.weights_bytes += weights_bytes(member.model, member.extra_weight_names)
        tag = member_tag(i)
        if member.feature_key is not None and member.feature_key in shared:
            result = shared[member.feature_key]
        elif out_of_core:
            result = _member_factors(run, member, tag, costs, stream_rows)
        else:
            result = _score_member(run, member, tag, costs, checkpoints, checkpoint_lrs)
        if member.feature_key is not None:
            shared.setdefault(member.feature_key, result)
        if member.q_model is not None:
            with timer(costs, "score_s"):
                q = run.q_term(member.q_model)
            result = (
                replace(result, q=q)
                if isinstance(result, MemberFactors)
                else MemberResult(result.values, q, result.info)
            )
            costs.flops += run.fwd_flops * n_train
        if isinstance(result, MemberFactors):
            factors.append(result)
        else:
            combiner.add(result)
        members_info.append(
            {
                "label": member.label,
                "projection_seed": member.projection_seed,
                **member.info,
                **result.info,
            }
        )
        bar.update(1)
    bar.close()
    count = len(factors) if out_of_core else combiner.count
    if count != total:
        raise RuntimeError(f"ensemble produced {count} members, expected {total}")
    top = None
    block = None
    with timer(costs, "score_s"):
        if out_of_core:
            blocked = score_blocked(
                factors, m_obj.combine, n_train, budget, scores_out, top_k, progress
            )
            values, top, block = blocked.values, blocked.top, blocked.block
            costs.flops += 2.0 * n_test * n_train * sum(f.shape[1] for f in factors)
        else:
            values = combiner.result().numpy()
    del factors
    config = {
        "method": m_obj.name,
        "method_options": m_obj.options(),
        "ensemble": ensemble.to_dict(),
        "n_models": len(models),
        "members": members_info,
        "projection": projection,
        "proj_dim": proj_dim if projection not in ("none", "identity") else None,
        "seed": seed,
        "dtype": dtype,
        "chunk_size": chunk_size,
        "n_train": n_train,
        "n_test": x_test.shape[0],
        "task": task.name,
        "etda_version": __version__,
        "storage": storage,
        "out_of_core": bool(out_of_core),
        "score_block": block,
        "memory_budget": budget,
        "executor": executor,
        "wall_s": time.perf_counter() - t_start,
    }
    scores = Scores(values, m_obj.name, config, costs)
    if top is not None:
        scores.topk = top
    if tmp_store is not None:
        tmp_store.cleanup()
    return scores


def _dense_need(n_train: int, n_test: int, k: int) -> int:
    """Bytes the dense path holds at its peak: one member's training features in float64
    twice (matrix and solve) plus three ``(n_test, n_train)`` float64 score matrices."""
    return 16 * n_train * k + 24 * n_train * n_test


def member_tag(i: int) -> str:
    """The store folder of member ``i`` (members sharing features use the first one's)."""
    return f"member-{i:03d}"


def _member_factors(run: _Run, member: Member, tag: str, costs: Costs, block: int) -> MemberFactors:
    train_st, test_b, fz = run.featurize(member, member.model, tag, costs, load_train=False)
    ctx = MemberContext(member.model, run.task, fz.params)
    with timer(costs, "score_s"):
        f = run.method.factors(train_st, test_b, ctx, block)
        f = replace(f, left=f.left.to(run.torch_dtype))  # the features' precision
        if train_st.folder is not None:  # on disk until every member is in: memory stays flat
            f = f.spill(train_st.folder.parent / "left.npy")
    return f


def _lora_type() -> type:
    from etda.ensemble.lora import LoRA

    return LoRA


def _score_member(
    run: _Run,
    member: Member,
    tag: str,
    costs: Costs,
    checkpoints: Sequence | None,
    checkpoint_lrs: Sequence[float] | None,
) -> MemberResult:
    m_obj: Method = run.method
    if not m_obj.uses_checkpoints:
        train_b, test_b, fz = run.featurize(member, member.model, tag, costs)
        ctx = MemberContext(
            member.model,
            run.task,
            fz.params,
            (_cast(run.x_train, run.torch_dtype), run.y_train),
            fz,
            (_cast(run.x_test, run.torch_dtype), run.y_test),
        )
        with timer(costs, "score_s"):
            return m_obj.member(train_b, test_b, ctx)
    states = member.checkpoints
    if states is None:
        ck = checkpoints[member.model_index] if _nested(checkpoints) else checkpoints
        lrs = list(checkpoint_lrs) if checkpoint_lrs is not None else [1.0] * len(ck)
        if len(lrs) != len(ck):
            raise ValueError(f"{len(ck)} checkpoints but {len(lrs)} checkpoint_lrs")
        states = list(zip(ck, lrs, strict=True))
    total: Tensor | None = None
    for c, (state, lr) in enumerate(states):
        model = _load_checkpoint(member.model, state)
        train_b, test_b, fz = run.featurize(member, model, f"{tag}-ckpt{c:02d}", costs)
        with timer(costs, "score_s"):
            r = m_obj.member(train_b, test_b, MemberContext(model, run.task, fz.params))
            total = r.values * lr if total is None else total.add_(r.values, alpha=lr)
    return MemberResult(total, info={"checkpoints": len(states)})


def _nested(checkpoints: Sequence | None) -> bool:
    return bool(checkpoints) and isinstance(checkpoints[0], list | tuple)
