"""Where etda caches what it computes for its built-in settings (trained models, LDS ground
truths, text, saved attributions): ``$ETDA_CACHE_DIR`` when set, else the user's cache
folder (``$XDG_CACHE_HOME/etda`` or ``~/.cache/etda``) — never the working directory unless
asked. The repository's scripts set ``ETDA_CACHE_DIR=runs`` so that a checkout keeps its
caches beside its benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ETDA_CACHE_DIR"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "etda"


def cache_path(name: str, given: str | os.PathLike | None = None) -> Path:
    """``given`` when the caller chose a folder, else ``cache_root() / name``."""
    return Path(given) if given is not None else cache_root() / name
