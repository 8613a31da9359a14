"""Featurize ensemble members, and shards of the training set within a member, as
independent jobs on an executor (local processes or Ray) writing to one feature store.

The driver opens every member's stores (validating or creating their metadata), splits the
missing rows into shards of whole chunks and submits one job per shard. A job rebuilds the
member's featurizer from its spec (projections come from seeds, so every worker builds the
same ones), computes its chunks exactly as a single process would (same chunk boundaries,
one torch thread), writes the rows into the store's files and returns their checksums; only
the driver records rows as done. A crash loses at most the shards in flight, and the
result is bit-identical to featurizing in one process with one thread.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from etda import batch
from etda.cost import Costs, timer
from etda.features.featurize import FeatureSpec, Featurizer
from etda.features.service import FeatureRequest, FeatureService, compute_rows
from etda.features.store import SplitStore, _checksum
from etda.io import bar_off
from etda.parallel import default_workers, get_executor, resolve
from etda.task import Task


@dataclass
class ShardJob:
    """Everything one worker needs to featurize rows of one member's split (picklable)."""

    model: nn.Module
    task: Task
    params: list[str]
    spec: FeatureSpec
    probe: tuple[Tensor, Tensor]
    use_hooks: bool
    x: Any  # rows [base, base + len(x)) of the split, or a shared handle to all of it
    y: Any
    base: int
    ranges: list[tuple[int, int]]  # absolute row ranges to compute (chunk boundaries)
    offset: int  # example-index offset (test examples have their own mask keys)
    dtype: torch.dtype
    folder: Path
    n: int
    widths: dict[str, int]
    storage: str
    what: str
    curvature: Any = None  # the member's fitted Preconditioner (K-FAC/EK-FAC), if any


def featurize_shard(job: ShardJob) -> list[tuple[int, int, str]]:
    """Compute and write the job's rows; return ``(lo, hi, checksum)`` per chunk."""
    torch.set_num_threads(1)  # results must not depend on the worker's thread count
    model = job.model
    x, y = _tensor(resolve(job.x)), _tensor(resolve(job.y))
    fz = Featurizer(
        model, job.task, job.params, job.spec, job.probe, job.use_hooks, curvature=job.curvature
    )
    st = SplitStore(job.folder, job.n, job.widths, job.dtype, job.storage)
    done = []
    for lo, hi in job.ranges:
        blocks = compute_rows(
            model,
            fz,
            x,
            y,
            lo - job.base,
            hi - job.base,
            job.offset + job.base,
            job.dtype,
            job.what,
        )
        arrays = st.encode(blocks)
        st.write_encoded(lo, hi, arrays)
        done.append((lo, hi, _checksum([arrays[k] for k in st.widths], 0, hi - lo)))
    return done


def _tensor(a: Any) -> Any:
    if batch.is_lazy(a):
        return a
    if isinstance(a, dict):  # dict inputs travel as slices of tensors
        return {k: _tensor(v) for k, v in a.items()}
    if isinstance(a, Tensor):
        return a
    with warnings.catch_warnings():  # a zero-copy, read-only array: featurizing only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _shared_inputs(ex: Any, split: Any) -> tuple[Any, Any]:
    """What every shard job of ``split`` carries: streamed inputs themselves (each job reads
    its own rows), ``(None, None)`` for dict inputs (slices per job), else shared arrays."""
    if batch.is_lazy(split.x):
        return split.x, split.y
    if batch.is_dict(split.x):
        return None, None
    return ex.share(split.x.numpy()), ex.share(split.y.numpy())


def _shards(ranges: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """Consecutive ranges grouped into at most ``count`` shards of similar row counts."""
    if not ranges:
        return []
    total = sum(hi - lo for lo, hi in ranges)
    target = -(-total // max(1, count))
    out: list[list[tuple[int, int]]] = [[]]
    rows = 0
    for r in ranges:
        if rows >= target:
            out.append([])
            rows = 0
        out[-1].append(r)
        rows += r[1] - r[0]
    return out


def featurize_parallel(
    service: FeatureService,
    requests: list[FeatureRequest],
    costs: Costs,
    executor: str,
    workers: int | None = None,
    address: str | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> int:
    """Fill the stores of every request (each tag once) with shard jobs on ``executor``.

    Returns the number of jobs run. The member loop afterwards finds the stores complete
    and only loads them; featurization seconds are charged to ``costs`` here."""
    n_workers = workers or default_workers()
    with timer(costs, "featurize_train_s"), get_executor(executor, n_workers, address) as ex:
        # With an object store (Ray) each split's inputs travel once, not once per job;
        # shared lazily, so a complete store starts no workers at all.
        shared: dict[str, tuple] = {}
        # A copy: a view would drag its whole storage (the training set) into every pickle.
        probe = (
            batch.apply(batch.take(service.train.x, 0, 1), lambda t: t.clone()),
            service.train.y[:1].clone(),
        )
        jobs: list[ShardJob] = []
        stores: list[SplitStore] = []
        seen: set[str] = set()
        for req in requests:
            if req.tag in seen:
                continue
            seen.add(req.tag)
            for name in splits:
                fz, meta = service.featurizer(req, name)
                split = service.split(name)
                st = service.open(fz, meta, req.tag, split)
                ranges = list(st.missing(service.chunk_size))
                count = 2 * n_workers if name == "train" else 1
                for shard in _shards(ranges, count):
                    lo, hi = shard[0][0], shard[-1][1]
                    if name not in shared:
                        shared[name] = _shared_inputs(ex, split)
                    sx, sy = shared[name]
                    data = (
                        (sx, sy, 0)
                        if sx is not None
                        else (batch.take(split.x, lo, hi), split.y[lo:hi], lo)
                    )
                    jobs.append(
                        ShardJob(
                            req.model,
                            service.task,
                            fz.params,
                            fz.spec,
                            probe,
                            service.use_hooks,
                            *data,
                            shard,
                            split.offset,
                            service.torch_dtype,
                            st.folder,
                            st.n,
                            st.widths,
                            st.storage,
                            f"{req.tag} {name}",
                            fz.curvature,
                        )
                    )
                    stores.append(st)
        bar = tqdm(total=len(jobs), desc="featurize shards", disable=bar_off(service.progress))
        for pos, done in ex.map(featurize_shard, jobs):
            for lo, hi, cs in done:
                stores[pos].record(lo, hi, cs)
            bar.update(1)
        bar.close()
    return len(jobs)
