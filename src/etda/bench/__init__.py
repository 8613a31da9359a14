"""Benchmarks: declarative sweeps (``etda.bench.sweeps``) and their runner (``etda bench``)."""

from etda.bench.runner import default_out, load_results, run_bench, run_config
from etda.bench.sweeps import (
    FULL,
    QUICK,
    SWEEPS,
    BenchConfig,
    MislabelConfig,
    Sweep,
    VarianceConfig,
    get_sweep,
)

__all__ = [
    "FULL",
    "QUICK",
    "SWEEPS",
    "BenchConfig",
    "MislabelConfig",
    "Sweep",
    "VarianceConfig",
    "default_out",
    "get_sweep",
    "load_results",
    "run_bench",
    "run_config",
]
