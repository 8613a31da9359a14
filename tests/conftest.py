"""Fixtures and hooks shared by the test modules.

Data-gated tests (see ``datagate.py``) skip on a developer's machine when their data is
missing and fail in CI (``CI=true`` or ``ETDA_REQUIRE_DATA=1``, set by ``.ci/run``); in CI any
other skip fails too, and every run prints its skip count.
"""

from __future__ import annotations

import datagate
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CPU cores (and
    makes results independent of the machine's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _have_kjv() -> bool:
    from etda.data.text import load_kjv

    try:
        load_kjv()
    except FileNotFoundError:
        return False
    return True


def _have_fashion_mnist() -> bool:
    """The IDX files where the loader looks (``$ETDA_FASHION_MNIST_DIR`` or the default)."""
    from etda.data.fashion_mnist import _find, fashion_mnist_dir

    try:
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
            _find(fashion_mnist_dir(), stem)
    except FileNotFoundError:
        return False
    return True


needs_kjv = datagate.needs(_have_kjv, "needs the bible-kjv package: apt-get install -y bible-kjv")
needs_fashion_mnist = datagate.needs(
    _have_fashion_mnist,
    "needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist, or point "
    "ETDA_FASHION_MNIST_DIR at the four IDX files",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_data(check, reason): skip without the data, fail in CI (datagate.py)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    datagate.apply_marks(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI a skip of any kind is a failure: a run that cannot execute a test is not green."""
    report = yield
    why = datagate.required_by()
    if why and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped, which {why} does not allow: {reason}"
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    why = datagate.required_by()
    mode = f"{why}: skips fail" if why else "set ETDA_REQUIRE_DATA=1 to make skips fail"
    terminalreporter.write_line(f"etda: {skipped} test(s) skipped ({mode})")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """etda's default cache (trained models, ground truths, text) in a folder of this test
    session, never the user's cache or the working directory."""
    import os

    old = os.environ.get("ETDA_CACHE_DIR")
    os.environ["ETDA_CACHE_DIR"] = str(tmp_path_factory.mktemp("etda-cache"))
    yield
    if old is None:
        os.environ.pop("ETDA_CACHE_DIR", None)
    else:
        os.environ["ETDA_CACHE_DIR"] = old
