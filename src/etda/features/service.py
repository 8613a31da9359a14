"""The featurization service: one member's model -> its features on the training and test sets.

It owns everything between a member and its feature views: the featurizer (from the run's
projection and the member's seed), the stores (opened, validated against what produced them,
resumed), the rows still missing (computed chunk by chunk, with example indices for
per-example randomness), and the member tags that name store folders. The engine asks it for
a member's features; executors (local processes, Ray) only run its shard jobs
(``etda.features.distributed``), so every path computes the same rows the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from etda import batch
from etda._version import __version__
from etda.cost import Costs, timer
from etda.features.blocks import Features, StreamedFeatures, TrainFeatures
from etda.features.capture import set_example_index
from etda.features.curvature import CurvatureSpec, FitInputs, Preconditioner
from etda.features.curvature import fit as fit_curvature
from etda.features.featurize import FeatureSpec, Featurizer, check_finite
from etda.features.store import FeatureStore, SplitStore
from etda.io import atomic_write, bar_off
from etda.task import ParamSelector, Task, q_weights, select_parameters

TEST_INDEX_OFFSET = 1 << 40  # test examples get their own keys for per-example masks


def member_tag(i: int) -> str:
    """The store folder of member ``i`` (members sharing features use the first one's)."""
    return f"member-{i:03d}"


def fingerprint(*data: batch.Inputs) -> str:
    """A short content hash of tensors or dicts of tensors (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for d in data:
        if batch.is_lazy(d):  # streamed inputs were hashed on their first pass
            h.update(d.digest.encode())
    tensors = [t for d in data if not batch.is_lazy(d) for t in batch.leaves(d)]
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights and of its leaf modules' settings (masks and adapters
    change the function, not just the weights)."""
    h = hashlib.sha256()
    for n, t in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for m in model.modules():
        if m is not model and not list(m.children()):
            h.update(m.extra_repr().encode())
    return h.hexdigest()[:24]


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
    device = _device(model)
    xb = batch.cast(batch.take(x, lo, hi), dtype, device)
    blocks = fz(xb, y[lo:hi].to(device))
    blocks = {k: v.cpu() for k, v in blocks.items()}
    check_finite(blocks, index - offset, what)
    return blocks


@dataclass(frozen=True)
class Split:
    """A dataset split as the service sees it: inputs, targets and the offset of its example
    keys (training examples 0.., test examples ``TEST_INDEX_OFFSET``..)."""

    name: str
    x: Tensor
    y: Tensor
    offset: int

    @property
    def n(self) -> int:
        return batch.n_rows(self.x)


@dataclass
class FeatureRequest:
    """What to featurize: a member's model, its parameter selection, projection seed and tag."""

    model: nn.Module
    seed: int
    tag: str
    params: ParamSelector = "all"  # "all": the run's parameter selection


class FeatureService:
    """Features of ensemble members on one run's training and test sets (see the module doc).

    ``projection``/``proj_dim``/``target``/``dtype`` fix the featurizer of every member (its
    seed varies); ``store``: where features live (``FeatureStore(None)``: in memory);
    ``chunk_size``: rows per featurizer call, and the unit of resumption.
    """

    def __init__(
        self,
        task: Task,
        train: Split,
        test: Split,
        store: FeatureStore,
        *,
        projection: str,
        proj_dim: int,
        target: str,
        dtype: str,
        chunk_size: int,
        storage: str = "float32",
        params: ParamSelector = "all",
        use_hooks: bool = True,
        progress: bool = False,
        fwd_flops: float = 0.0,
        curvature: CurvatureSpec | None = None,
        test_target: str | None = None,
        kernel_dtype: str = "float64",
        solve_dtype: str = "float64",
    ) -> None:
        self.task, self.train, self.test, self.store = task, train, test, store
        self.projection, self.proj_dim, self.target = projection, proj_dim, target
        self.dtype, self.torch_dtype = dtype, getattr(torch, dtype)
        self.chunk_size, self.storage, self.params = chunk_size, storage, params
        self.use_hooks, self.progress, self.fwd_flops = use_hooks, progress, fwd_flops
        self.curvature = curvature
        self.kernel_dtype = getattr(torch, kernel_dtype)  # precision of the Gram products
        self.solve_dtype = getattr(torch, solve_dtype)  # of the damped solves
        self.test_target = test_target or target  # the test side's scalar (IF measure=)
        self._preconditioners: dict[tuple[str, str], Any] = {}

    def spec(self, seed: int, split: str = "train") -> FeatureSpec:
        target = self.test_target if split == "test" else self.target
        return FeatureSpec(self.projection, self.proj_dim, seed, target, self.dtype)

    def featurizer(self, req: FeatureRequest, split: str = "train") -> tuple[Featurizer, dict]:
        """The member's featurizer of ``split`` and the metadata its stores are validated
        against (the test side may differentiate another scalar: ``test_target``)."""
        params = select_parameters(req.model, self.params if req.params == "all" else req.params)
        spec = self.spec(req.seed, split)
        probe = (self.train.x, self.train.y)
        meta = {
            "etda_version": __version__,
            "weights": model_fingerprint(req.model),
            "params": hashlib.sha256("|".join(params).encode()).hexdigest()[:16],
            "spec": spec.to_dict(),
            "task": self.task.name,
            "hooks": self.use_hooks,
        }
        pre = None
        if self.curvature is not None:
            meta["curvature"] = self.curvature.to_dict()
            key = (req.tag, meta["weights"])
            if key not in self._preconditioners:  # one fit per member, for both splits
                self._preconditioners[key] = self.preconditioner(req, params, meta)
            pre = self._preconditioners[key]
        fz = Featurizer(
            req.model, self.task, params, spec, probe, use_hooks=self.use_hooks, curvature=pre
        )
        return fz, meta

    def preconditioner(self, req: FeatureRequest, params: list[str], meta: dict):
        """The member's fitted curvature: loaded from its store folder when one was saved for
        the same weights, data and curvature, else fitted (resuming an interrupted fit) and
        saved there. In memory without a store."""
        from etda.features.capture import find_layers

        spec = self.curvature
        key = {**meta, "data": fingerprint(self.train.x, self.train.y)}
        key.pop("spec", None)  # the projection does not change the curvature
        key_text = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = None if self.store.root is None else Path(self.store.root) / req.tag
        path = None if folder is None else folder / "curvature.safetensors"
        if path is not None and path.exists():
            pre = Preconditioner.from_bytes(path.read_bytes(), spec, {"key": key_text})
            if pre is not None:
                return pre
        layers, rest = find_layers(req.model, params) if self.use_hooks else ([], list(params))
        bar = tqdm(
            total=self.train.n * (2 if spec.kind == "ekfac" else 1),
            desc=f"{req.tag} curvature ({spec.kind})",
            unit="ex",
            leave=False,
            disable=bar_off(self.progress),
        )
        inputs = FitInputs(
            req.model,
            self.task,
            layers,
            rest,
            self.train.x,
            self.train.y,
            self.chunk_size,
            self.torch_dtype,
            bar.update,
        )
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        pre = fit_curvature(spec, inputs, folder, key_text)
        bar.close()
        if path is not None:
            atomic_write(path, pre.to_bytes({"key": key_text}))
        return pre

    def split(self, name: str) -> Split:
        return self.train if name == "train" else self.test

    def open(self, fz: Featurizer, meta: dict, tag: str, split: Split) -> SplitStore:
        """Open (resume, validate) the store of one member's split."""
        return self.store.split(
            tag,
            split.name,
            {**meta, "data": fingerprint(split.x, split.y)},
            split.n,
            fz.widths(),
            fz.spec.torch_dtype,
            self.storage,
        )

    def fill(
        self, st: SplitStore, fz: Featurizer, model: nn.Module, split: Split, what: str
    ) -> None:
        """Compute the rows the store is missing, chunk by chunk."""
        todo = list(st.missing(self.chunk_size))
        bar = tqdm(
            total=sum(hi - lo for lo, hi in todo),
            desc=what,
            unit="ex",
            leave=False,
            disable=bar_off(self.progress),
        )
        for lo, hi in todo:
            rows = compute_rows(
                model, fz, split.x, split.y, lo, hi, split.offset, self.torch_dtype, what
            )
            st.write(lo, hi, rows)
            bar.update(hi - lo)
        bar.close()

    def featurize(
        self,
        req: FeatureRequest,
        costs: Costs,
        stream_block: int | None = None,
        splits: tuple[str, ...] = ("train", "test"),
    ) -> tuple[TrainFeatures, Features | None, Featurizer]:
        """Fill the member's stores (only missing rows) and return its views: the training
        features (in memory, or streamed ``stream_block`` rows at a time from the store) and
        the test features (None when ``splits`` leaves the test set out)."""
        with timer(costs, "featurize_train_s"):  # a curvature is fitted here
            train = self.featurizer(req)
        views: dict[str, Any] = {}
        n = 0
        for name in splits:
            split = self.split(name)
            with timer(costs, f"featurize_{name}_s"):
                fz, meta = train if name == "train" else self.featurizer(req, name)
                st = self.open(fz, meta, req.tag, split)
                self.fill(st, fz, req.model, split, f"{req.tag} {name}")
                streamed = name == "train" and stream_block is not None
                views[name] = (
                    StreamedFeatures(st, stream_block, self.solve_dtype)
                    if streamed
                    else Features(st.load(), self.kernel_dtype, self.solve_dtype)
                )
            costs.feature_bytes += st.feature_nbytes()
            n += split.n
        costs.flops += 3 * self.fwd_flops * n
        return views["train"], views.get("test"), train[0]

    def q_term(self, model: nn.Module) -> Tensor:
        """TRAK's Q of the training set under ``model`` (forward passes only), float64."""
        qs = []
        x, y = self.train.x, self.train.y
        with torch.no_grad():
            n = batch.n_rows(x)
            device = _device(model)
            for lo in range(0, n, self.chunk_size):
                hi = min(lo + self.chunk_size, n)
                set_example_index(model, torch.arange(lo, hi))
                xb = batch.cast(batch.take(x, lo, hi), self.torch_dtype, device)
                out = batch.run_model(model, xb, self.task)
                qs.append(q_weights(self.task, out, y[lo:hi].to(device)).cpu())
        return torch.cat(qs).to(torch.float64)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def load_checkpoint(model: nn.Module, state: dict | nn.Module) -> nn.Module:
    """A copy of ``model`` with the weights of ``state`` (a state dict or a module)."""
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
