"""Skip or fail: what a test does when the data or optional package it needs is missing.

On a developer's machine a missing Debian data package (``dataset-fashion-mnist``,
``bible-kjv``), committed result file or optional package (``ray``) skips the tests that need
it. In CI (``CI=true``, or ``ETDA_REQUIRE_DATA=1``, which ``.ci/run`` sets) the same test
*fails* with a message saying what to install: a CI run cannot pass by skipping. The
conftest also turns any other skip into a failure there and prints the run's skip count.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from types import ModuleType

import pytest

REQUIRE_ENV = "ETDA_REQUIRE_DATA"
TRUE = ("1", "true", "yes", "on")

RUN, SKIP, FAIL = "run", "skip", "fail"


def required_by(env: Mapping[str, str] | None = None) -> str | None:
    """Why missing data must fail this run (``"CI=true"``, ``"ETDA_REQUIRE_DATA=1"``), or
    None when it may skip."""
    env = os.environ if env is None else env
    for name in (REQUIRE_ENV, "CI"):
        value = env.get(name, "")
        if value.strip().lower() in TRUE:
            return f"{name}={value}"
    return None


def decide(available: bool, env: Mapping[str, str] | None = None) -> str:
    """``run`` when the data is there, else ``fail`` in CI and ``skip`` elsewhere."""
    if available:
        return RUN
    return FAIL if required_by(env) else SKIP


def require(available: bool, reason: str, env: Mapping[str, str] | None = None) -> None:
    """Inside a test (or fixture): return if ``available``, else skip or fail (see module)."""
    verdict = decide(available, env)
    if verdict == FAIL:
        pytest.fail(
            f"{reason} (a data-gated test may not skip when {required_by(env)}: install what "
            "it names, e.g. with scripts/setup.sh)",
            pytrace=False,
        )
    if verdict == SKIP:
        pytest.skip(reason)


def require_module(name: str, reason: str | None = None) -> ModuleType:
    """``pytest.importorskip`` that fails instead of skipping in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, reason or f"needs the optional package {name!r} (pip install -e '.[all]')")
        raise  # unreachable: require() skipped or failed


def needs(check: Callable[[], bool], reason: str) -> pytest.MarkDecorator:
    """A mark: run the test only when ``check()`` (called once, at set-up of the first test
    that needs it) is true, else :func:`require` decides (the conftest applies it)."""
    return pytest.mark.needs_data(check=functools.cache(check), reason=reason)


def apply_marks(item: pytest.Item) -> None:
    """The conftest's set-up hook: enforce every ``needs_data`` mark of ``item``."""
    for mark in item.iter_markers("needs_data"):
        require(bool(mark.kwargs["check"]()), mark.kwargs["reason"])
