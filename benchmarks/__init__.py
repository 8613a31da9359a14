"""Benchmark scripts. They cache models and ground truths in the repository's ``runs/``
(``ETDA_CACHE_DIR`` when set), beside the results they commit."""

import os
from pathlib import Path

os.environ.setdefault("ETDA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "runs"))
