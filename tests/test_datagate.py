"""The skip-or-fail gate of data-gated tests (``datagate.py``, applied by the conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import datagate
import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = {"CI": "true"}
REQUIRE = {"ETDA_REQUIRE_DATA": "1"}


@pytest.mark.parametrize(
    "env,why",
    [
        ({}, None),
        ({"CI": "false"}, None),
        ({"CI": "", "ETDA_REQUIRE_DATA": "0"}, None),
        (CI, "CI=true"),
        ({"CI": "1"}, "CI=1"),
        (REQUIRE, "ETDA_REQUIRE_DATA=1"),
        ({"ETDA_REQUIRE_DATA": "yes", "CI": "true"}, "ETDA_REQUIRE_DATA=yes"),
    ],
)
def test_required_by(env, why):
    assert datagate.required_by(env) == why


def test_decide():
    assert datagate.decide(True, {}) == datagate.decide(True, CI) == datagate.RUN
    assert datagate.decide(False, {}) == datagate.SKIP
    assert datagate.decide(False, CI) == datagate.decide(False, REQUIRE) == datagate.FAIL


def test_require_skips_locally_and_fails_in_ci():
    datagate.require(True, "present", CI)  # returns
    with pytest.raises(pytest.skip.Exception, match="needs X"):
        datagate.require(False, "needs X", {})
    with pytest.raises(pytest.fail.Exception, match=r"needs X .*ETDA_REQUIRE_DATA=1"):
        datagate.require(False, "needs X", REQUIRE)


def test_require_module(monkeypatch):
    assert datagate.require_module("json").__name__ == "json"
    for name in ("CI", "ETDA_REQUIRE_DATA"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match="etda_no_such_package"):
        datagate.require_module("etda_no_such_package")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="etda_no_such_package"):
        datagate.require_module("etda_no_such_package")


def test_ci_script_requires_data():
    text = (ROOT / ".ci" / "run").read_text()
    assert "export ETDA_REQUIRE_DATA=1" in text and "scripts/test.sh" in text


GATED = """
import pytest
import datagate

missing = datagate.needs(lambda: False, "needs the moon")
present = datagate.needs(lambda: True, "needs the sun")

@missing
def test_gated():
    pass

@present
def test_present():
    pass

def test_plain_skip():
    pytest.skip("not today")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False
"""


@pytest.mark.parametrize("ci", [False, True])
def test_a_suite_that_would_skip_fails_in_ci(tmp_path, ci):
    """End to end: the real conftest on a throw-away suite; locally two tests skip (and the
    count is printed), in CI both fail and the run exits non-zero; xfail stays xfail."""
    for name in ("conftest.py", "datagate.py"):
        shutil.copy(ROOT / "tests" / name, tmp_path / name)
    (tmp_path / "test_gated.py").write_text(GATED)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ETDA_REQUIRE_DATA")}
    if ci:
        env["ETDA_REQUIRE_DATA"] = "1"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    if ci:
        assert proc.returncode == 1, out
        assert "etda: 0 test(s) skipped (ETDA_REQUIRE_DATA=1: skips fail)" in out, out
        assert "needs the moon (a data-gated test may not skip" in out, out
        assert "skipped, which ETDA_REQUIRE_DATA=1 does not allow: not today" in out, out
        assert "1 passed" in out and "1 xfailed" in out, out
    else:
        assert proc.returncode == 0, out
        assert "etda: 2 test(s) skipped (set ETDA_REQUIRE_DATA=1" in out, out
        assert "1 passed, 2 skipped, 1 xfailed" in out, out
