"""Small I/O helpers used across etda: atomic file writes and human-readable sizes/times.

Sizes use binary multiples everywhere (``human_bytes`` prints them, ``parse_size`` reads
them): ``"27.9 MB"`` is 27.9 * 2**20 bytes; ``MiB`` and friends mean the same.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

Writer = bytes | str | Callable[[BinaryIO], None]


def atomic_write(path: str | os.PathLike, data: Writer, mode: int | None = None) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path``
    through a temporary file in the same folder renamed into place: readers see the old
    file or the new one, never half of one, and a failure leaves nothing behind.
    ``mode``: file permissions (e.g. ``0o644`` for a shared cache; default: private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_SECONDS = {
    **dict.fromkeys(("", "s", "sec", "secs", "second", "seconds"), 1.0),
    "ms": 1e-3,
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
_BYTES = {
    "": 1,
    "b": 1,
    **{u: 2**10 for u in ("kb", "k")},
    **{u: 2**20 for u in ("mb", "m")},
    **{u: 2**30 for u in ("gb", "g")},
    **{u: 2**40 for u in ("tb", "t")},
}


def _parse(text: str | float, units: dict, what: str, example: str) -> float:
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", str(text).strip())
        unit = m.group(2).lower() if m else ""
        if what == "size":
            unit = unit.replace("ib", "b")
        if m is None or unit not in units:
            raise ValueError(f"cannot read {what} {text!r}; write e.g. {example}")
        value = float(m.group(1)) * units[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a {what} must be a positive finite amount, got {text!r}")
    return value


def parse_seconds(text: str | float) -> float:
    """``"60s"``, ``"90"`` (seconds), ``"500ms"``, ``"5m"``, ``"1.5h"`` -> seconds."""
    return _parse(text, _SECONDS, "duration", "60s, 90, 5m or 1.5h")


def parse_size(text: str | float) -> int:
    """``"500MB"``, ``"2GB"``, ``"800KB"``, ``"1e9"`` or an int (bytes) -> bytes, binary units
    (1 MB = 1024**2 bytes, as :func:`human_bytes` prints them)."""
    return int(_parse(text, _BYTES, "size", "500MB, 2GB, 800KB or 1e9"))


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary multiples)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_seconds(s: float) -> str:
    """``3.18 s``, ``26.1 s``, ``1234 s``."""
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s" if s < 1000 else f"{s:.0f} s"


def bar_off(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for, and off when stderr is not a terminal
    (``None``: tqdm decides), so logs never fill with escape codes."""
    return None if progress else True


EXTRAS = {  # module -> the etda extra that installs it
    "peft": "lora",
    "matplotlib": "plots",
    "sklearn": "data",
    "ray": "ray",
    "transformers": "hf",
    "tokenizers": "hf",
}


def require(module: str, what: str) -> Any:
    """Import ``module`` for ``what``, or an ImportError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise ImportError(
            f"{what} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'etda[{extra}]' (or 'etda[all]')"
        ) from e
