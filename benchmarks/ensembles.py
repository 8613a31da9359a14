"""The ensembles benchmark on fmnist-mlp (issue 4): every ensemble kind x size for TRAK, the
other methods at one size each, with LDS and every cost, mislabel detection and the
variance theory. A thin entry point to ``etda bench`` (the sweep table lives in
``etda.bench.sweeps.FULL``); results are resumable and land in
``benchmarks/results/fmnist-mlp/`` (results.json, report.md, Pareto plots).

    python -m benchmarks.ensembles            # same as: etda bench --setting fmnist-mlp
"""

from __future__ import annotations

import torch

from etda.bench.runner import run_bench


def main() -> None:
    torch.set_num_threads(2)
    run_bench("fmnist-mlp", out="benchmarks/results/fmnist-mlp", progress=True)


if __name__ == "__main__":
    main()
