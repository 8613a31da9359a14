"""Executors: every executor yields every (position, result) once, workers use one thread."""

from __future__ import annotations

import os

import pytest
import torch

from etda.parallel import (
    Executor,
    InProcess,
    LocalProcesses,
    RayExecutor,
    get_executor,
)


def _probe(job: int) -> tuple[int, int, int]:
    """(job squared, worker pid, torch threads in the worker)."""
    return job * job, os.getpid(), torch.get_num_threads()


def _fail_on_three(job: int) -> int:
    if job == 3:
        raise ValueError("job 3 failed")
    return job


def test_get_executor_names() -> None:
    assert isinstance(get_executor("inprocess"), InProcess)
    ex = get_executor("process", workers=3)
    assert isinstance(ex, LocalProcesses) and ex.workers == 3
    assert isinstance(get_executor("ray", workers=2), RayExecutor)  # lazy: Ray not started
    with pytest.raises(ValueError, match="unknown executor 'threads'"):
        get_executor("threads")
    with pytest.raises(ValueError, match="workers must be a positive int"):
        LocalProcesses(workers=0)


def test_inprocess_yields_in_order() -> None:
    out = list(InProcess().map(_probe, [1, 2, 3]))
    assert [(i, r[0]) for i, r in out] == [(0, 1), (1, 4), (2, 9)]
    assert list(InProcess().map(_probe, [])) == []


def test_local_processes_run_every_job_once_single_threaded() -> None:
    jobs = list(range(8))
    with LocalProcesses(workers=2) as ex:
        assert isinstance(ex, Executor)
        out = dict(ex.map(_probe, jobs))
        assert sorted(out) == jobs
        assert all(out[i][0] == i * i for i in jobs)
        assert all(pid != os.getpid() for _, pid, _ in out.values())
        assert {threads for _, _, threads in out.values()} == {1}
        # The pool is reused by a second map call, and errors reach the caller.
        with pytest.raises(ValueError, match="job 3 failed"):
            dict(ex.map(_fail_on_three, jobs))
        assert dict(ex.map(_probe, [5]))[0][0] == 25
    ex.close()  # closing twice is harmless
