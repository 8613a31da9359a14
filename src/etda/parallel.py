"""Executors: run picklable jobs in-process, in local worker processes, or on Ray.

Every executor has one method, ``map(fn, jobs)``, that calls ``fn(job)`` for each job and
yields ``(position, result)`` pairs as jobs complete (in any order). ``fn`` must be a
module-level function and each job picklable, so that the same call works with every
executor. Workers run torch with one thread each: several single-threaded workers use a
machine better than one multi-threaded one for small models, and results do not depend on
how many threads a worker happened to get.

    with get_executor("process", workers=4) as ex:
        for i, result in ex.map(train_one, jobs):
            ...
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, restoring the previous count after."""
    import torch  # not at module level: workers set thread variables before torch loads

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


EXECUTORS = ("inprocess", "process", "ray")


def default_workers() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise ValueError(f"workers must be a positive int or None (one per core), got {workers!r}")
    return workers


def _single_thread() -> None:
    """Worker set-up: one torch (and OpenMP/BLAS) thread."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # before torch is imported in a fresh worker
    import torch

    torch.set_num_threads(1)


class Executor(ABC):
    """Runs ``fn(job)`` for each job; yields ``(position in jobs, result)`` as jobs complete.

    Executors are context managers; ``close()`` releases workers (it is safe to call twice).
    If the consumer stops iterating early, or a job raises, jobs not yet started are cancelled
    and the job's exception is re-raised in the caller.
    """

    @abstractmethod
    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, fn(jobs[i]))`` for every i, in completion order."""

    def share(self, obj: Any) -> Any | None:
        """A handle to ``obj`` that jobs can carry instead of a copy (``resolve`` it in the
        job), or None where there is no shared object store (jobs then carry their data)."""
        return None

    def close(self) -> None:  # noqa: B027  (a no-op default: InProcess holds nothing)
        """Release workers; the executor must not be used afterwards."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Executor):
    """Runs jobs one after another in this process (debugging, tests, tiny workloads)."""

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            yield i, fn(job)

    def __repr__(self) -> str:
        return "InProcess()"


def _mp_context() -> mp.context.BaseContext:
    # Never "fork": forking a process that has started torch's thread pools can deadlock.
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


class LocalProcesses(Executor):
    """A pool of ``workers`` local processes (default: one per core), one torch thread each.

    Workers start on first use (each imports torch, about a second) and are reused by later
    ``map`` calls until ``close()``. As with any "spawn"/"forkserver" pool, workers re-import
    the main script: code that calls ``map`` from a script must sit under
    ``if __name__ == "__main__":``.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = _check_workers(workers)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_mp_context(), initializer=_single_thread
            )
            # Shut workers down even if the caller forgets close().
            self._finalizer = weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        return self._pool

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not jobs:
            return
        pool = self._get_pool()
        futures: dict[Future, int] = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield futures[future], future.result()
        except BrokenProcessPool as exc:
            self._drop_pool(wait=False)  # unusable now; the next map starts a fresh pool
            raise RuntimeError(
                "a worker process died: out of memory, killed, or a script that starts workers "
                "without an `if __name__ == '__main__':` guard (workers re-import the main "
                "script); fix that, or use executor='inprocess' to see the error directly"
            ) from exc
        finally:
            for future in pending:  # early exit or error: do not start the rest
                future.cancel()

    def _drop_pool(self, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._finalizer.detach()
            self._pool = None

    def close(self) -> None:
        self._drop_pool(wait=True)

    def __repr__(self) -> str:
        return f"LocalProcesses(workers={self.workers})"


def _ray_call(fn: Callable[[Any], Any], job: Any) -> Any:
    import torch

    torch.set_num_threads(1)
    return fn(job)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Make a local ``ray.init`` keep to 127.0.0.1 even if ray was imported before the
    environment variable was set (ray caches it in ``ray_constants.ENABLE_RAY_CLUSTER``)."""
    try:
        from ray._private import ray_constants
    except ImportError:  # a ray without this module: rely on the environment variable
        yield
        return
    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old


class RayExecutor(Executor):
    """Runs each job as a Ray task using one CPU and one torch thread.

    ``address=None`` starts a private local Ray instance with ``workers`` CPUs (default: one
    per core) bound to 127.0.0.1, without dashboard or usage stats; ``close()`` shuts it down.
    With ``address`` (e.g. ``"ray://head:10001"`` or ``"auto"``) it connects to an existing
    cluster and leaves it running; ``workers`` then caps the number of tasks in flight.
    If Ray is already initialized in this process it is used as it is and never shut down.
    On a single machine ``LocalProcesses`` is lighter (Ray takes seconds and ~1 GB to start).
    """

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        # Only look for ray here: importing it fixes settings read from the environment.
        if importlib.util.find_spec("ray") is None:
            raise ImportError(
                "RayExecutor needs ray: pip install 'etda[ray]' (or use executor='process')"
            )
        self.address = address
        self.workers = None if workers is None else _check_workers(workers)
        self._owns_ray = False
        self._remote: Any = None

    def _start(self) -> Any:
        if self._remote is not None:
            return self._remote
        if self.address is None:
            # Set before ray is imported: ray reads them into constants at import time.
            # Without the first, Ray resolves _node_ip_address="127.0.0.1" to the machine's
            # external address and its servers listen on all interfaces (SPEC.md, "Ray on one
            # machine"); worker processes inherit both.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        from etda.io import require

        ray = require("ray", "the Ray executor")

        if not ray.is_initialized():
            if self.address is None:
                with _loopback_only():
                    ray.init(
                        address="local",  # a private instance, never someone else's cluster
                        num_cpus=self.workers or default_workers(),
                        _node_ip_address="127.0.0.1",
                        include_dashboard=False,
                        configure_logging=False,
                        log_to_driver=False,
                    )
            else:
                try:
                    ray.init(address=self.address, configure_logging=False)
                except Exception as exc:  # noqa: BLE001 - ray raises many kinds here
                    raise RuntimeError(
                        f"could not join the Ray cluster at {self.address!r} ({exc}). Check "
                        "that it is running (`ray status`); a cluster started with token "
                        "authentication needs RAY_AUTH_MODE=token here too (the token comes "
                        "from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                    ) from exc
            self._owns_ray = True
        self._remote = ray.remote(num_cpus=1)(_ray_call)
        return self._remote

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not jobs:
            return
        remote = self._start()  # first: it sets the environment before ray is imported
        import ray

        fn_ref = ray.put(fn)
        # Submit lazily when a cap is set, so a cluster is not flooded beyond `workers`.
        cap = self.workers if self.address is not None and self.workers else len(jobs)
        refs: dict[Any, int] = {}
        next_job = 0
        try:
            while next_job < len(jobs) or refs:
                while next_job < len(jobs) and len(refs) < cap:
                    refs[remote.remote(fn_ref, jobs[next_job])] = next_job
                    next_job += 1
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    yield refs.pop(ref), ray.get(ref)
        finally:
            for ref in refs:  # early exit or error: drop what has not finished
                ray.cancel(ref)

    def share(self, obj: Any) -> Any:
        """Put ``obj`` into Ray's object store once (numpy arrays are read zero-copy)."""
        self._start()
        import ray

        return ray.put(obj)

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self._remote = None

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self.workers})"


def resolve(handle: Any) -> Any:
    """The object behind a handle from ``Executor.share`` (anything else is returned as is)."""
    if type(handle).__name__ == "ObjectRef":
        import ray

        return ray.get(handle)
    return handle


def get_executor(
    name: str = "process", workers: int | None = None, address: str | None = None
) -> Executor:
    """An executor by name: ``"inprocess"``, ``"process"`` (local pool) or ``"ray"``."""
    if name == "inprocess":
        return InProcess()
    if name == "process":
        return LocalProcesses(workers)
    if name == "ray":
        return RayExecutor(address=address, workers=workers)
    raise ValueError(f"unknown executor {name!r}; use one of {EXECUTORS}")
