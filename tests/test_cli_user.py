"""The CLI on the user's own code, packaging conventions: references to a tiny package made
here, TOML configs, --json, missing extras, `etda --version` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

import etda
from etda.cli import app

PACKAGE = {
    "mypkg/__init__.py": "",
    "mypkg/models.py": """
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
    """,
    "mypkg/data.py": """
        import torch

        def _make(n, seed):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

        def train():
            return _make(30, 1)

        def test():
            return _make(5, 2)
    """,
    "mypkg/fit.py": """
        import torch
        from torch import nn

        from mypkg.models import build

        def train_fn(x, y, seed):
            torch.manual_seed(seed)
            model = build()
            opt = torch.optim.SGD(model.parameters(), lr=0.3)
            for _ in range(30):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return model.eval()
    """,
}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    for name, text in PACKAGE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[mod]


def _reference(method: str = "trak", **kw) -> np.ndarray:
    from mypkg.data import test, train
    from mypkg.models import build

    return etda.attribute(build(), train(), test(), method=method, **kw).values


REFS = ["--model", "mypkg.models:build", "--train", "mypkg.data:train", "--test", "mypkg.data:test"]


def test_cli_on_user_code_equals_the_python_api(user_package) -> None:
    out = user_package / "scores"
    runner = CliRunner()
    args = ["attribute", *REFS, "-m", "trak", "--out", str(out), "--json", "--no-progress"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["n_test"] == 5 and info["n_train"] == 30 and info["finite"]
    assert info["out"] == str(out) and len(info["top"]) == 3
    np.testing.assert_allclose(etda.Scores.load(out).values, _reference(), rtol=1e-6)
    # a cheap ensemble and IF with a curvature, by option
    args = ["attribute", *REFS, "-m", "if", "--curvature", "kfac", "-e", "dropout", "-M", "2"]
    result = runner.invoke(app, [*args, "--json", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["members"] == 2


def test_a_toml_config_holds_the_same_keys(user_package) -> None:
    config = user_package / "run.toml"
    config.write_text(
        'model = "mypkg.models:build"\ntrain = "mypkg.data:train"\ntest = "mypkg.data:test"\n'
        'method = "graddot"\nout = "from-toml"\n'
    )
    result = CliRunner().invoke(app, ["attribute", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(
        etda.Scores.load(user_package / "from-toml").values,
        _reference("graddot"),
        rtol=1e-6,
    )
    bad = user_package / "bad.toml"
    bad.write_text('modle = "x:y"\n')
    result = CliRunner().invoke(app, ["attribute", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key 'modle'" in result.output


def test_nothing_is_written_into_the_working_directory_by_default(user_package) -> None:
    before = sorted(p.name for p in user_package.iterdir())
    result = CliRunner().invoke(app, ["attribute", *REFS, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "not saved" in result.output
    assert sorted(p.name for p in user_package.iterdir() if p.name != "__pycache__") == [
        n for n in before if n != "__pycache__"
    ]


def test_bad_references_are_clear(user_package) -> None:
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--model",
            "mypkg.models:nope",
            "--no-progress",
            "--train",
            "mypkg.data:train",
            "--test",
            "mypkg.data:test",
        ],
    )
    assert result.exit_code == 2 and "has no 'nope'" in result.output
    result = CliRunner().invoke(app, ["attribute", "--model", "mypkg.models:build"])
    assert result.exit_code == 2 and "--train and --test" in result.output


def test_a_missing_extra_names_it(monkeypatch) -> None:
    import torch
    from torch import nn

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ImportError, match=r"pip install 'etda\[lora\]'"):
        etda.attribute(model, (x, y), (x, y), ensemble=etda.LoRA(members=1, epochs=1))


def test_version_does_not_import_torch() -> None:
    code = (
        "import sys; sys.argv = ['etda', '--version']; from etda._launch import main; main(); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["etda", etda.__version__, "torch", "not", "loaded"]


def test_progress_bars_stay_out_of_logs() -> None:
    from etda.io import bar_off

    assert bar_off(False) is True and bar_off(True) is None  # None: tqdm checks for a terminal


def test_built_in_settings_cache_outside_the_working_directory(tmp_path, monkeypatch) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ETDA_CACHE_DIR", str(cache))
    args = ["attribute", "-s", "digits-logreg", "-m", "graddot", "--no-progress"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []  # nothing in the working directory
    assert (cache / "models").is_dir() and list((cache / "attribute").iterdir())


def test_options_are_real_choices_with_completion() -> None:
    import click
    import typer.main

    command = typer.main.get_command(app).commands["attribute"]
    params = {p.name: p for p in command.params}
    ctx = click.Context(command)
    methods = [c.value for c in params["method"].shell_complete(ctx, "")]
    assert "trak" in methods and "if" in methods
    assert "dropout" in [c.value for c in params["ensemble"].shell_complete(ctx, "")]
    help_text = CliRunner().invoke(app, ["attribute", "--help"], env={"COLUMNS": "200"}).output
    flag_lines = [ln for ln in help_text.splitlines() if "--json" in ln or "--lds" in ln]
    assert flag_lines and not any("<bool>" in ln for ln in flag_lines)


def test_explain_saved_scores_of_user_data(user_package) -> None:
    (user_package / "mypkg" / "decode.py").write_text(
        "def decode(x):\n    return 'row ' + ' '.join(f'{v:.1f}' for v in x[:2].tolist())\n"
    )
    out = user_package / "scores"
    runner = CliRunner()
    result = runner.invoke(app, ["attribute", *REFS, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    args = ["explain", "--scores", str(out), "--train", "mypkg.data:train", "-t", "1"]
    result = runner.invoke(app, [*args, "--decode", "mypkg.decode:decode", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    scores = etda.Scores.load(out)
    best = scores.top(2)[1]["proponents"][0][0]
    assert f"train #{best}" in result.output and "'row " in result.output
    png = user_package / "grid.png"
    args += ["--test-data", "mypkg.data:test", "--png", str(png)]
    result = runner.invoke(app, args)  # 4 inputs: drawn as 2 x 2 images
    assert result.exit_code == 0, result.output
    assert "image grid" in result.output and png.stat().st_size > 1000


def test_lds_of_user_code_with_a_training_function(user_package, monkeypatch) -> None:
    from etda.evaluate.lds import LDSConfig, ground_truth, lds
    from etda.usercode import UserSetting

    monkeypatch.setenv("ETDA_CACHE_DIR", str(user_package / "cache"))
    args = ["attribute", *REFS, "--lds", "--train-fn", "mypkg.fit:train_fn", "--n-subsets", "6"]
    result = CliRunner().invoke(app, [*args, "--json", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["lds"]["mean"]
    from mypkg.data import test, train
    from mypkg.fit import train_fn

    retrainer = UserSetting("ref", train_fn, train(), test())
    gt = ground_truth(
        retrainer,
        LDSConfig(n_subsets=6),
        user_package / "ref-cache",
        executor="inprocess",
        progress=False,
    )
    assert got == pytest.approx(lds(_reference(), gt).mean, abs=1e-9)
    result = CliRunner().invoke(app, ["attribute", *REFS, "--lds"])
    assert result.exit_code == 2 and "--train-fn" in result.output


def test_counterfactual_and_clean_of_user_code_equal_the_python_api(
    user_package, monkeypatch
) -> None:
    from etda.evaluate.counterfactual import cleaning_effects, counterfactual, harm_ranking
    from etda.usercode import UserSetting

    monkeypatch.setenv("ETDA_CACHE_DIR", str(user_package / "cache"))
    user = [*REFS, "--train-fn", "mypkg.fit:train_fn", "--seeds", "1", "--json", "--no-progress"]
    args = ["counterfactual", *user, "-m", "trak", "--tests", "3", "--percent", "10,30"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    from mypkg.data import test, train
    from mypkg.fit import train_fn

    retrainer = UserSetting("ref", train_fn, train(), test())
    scores = {"trak": _reference()}
    want = counterfactual(retrainer, scores, 3, (10, 30), (0,), cache_dir=user_package / "ref")
    assert got["methods"] == want["methods"] and got["ks"] == [3, 9]
    assert set(got["methods"]) == {"trak", "random", "nearest neighbours"}
    # a rerun reads every retrained model from the cache
    again = json.loads(CliRunner().invoke(app, args, catch_exceptions=False).output)
    assert again["methods"] == got["methods"] and again["costs"]["trained"] == 0

    args = ["clean", *user, "--percent", "10"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["methods"]
    assert set(got) == {"none", "if harm", "random", "training loss"}
    want = cleaning_effects(
        retrainer,
        {"if harm": harm_ranking(_reference("if"), np.arange(0, 5, 2))},
        [0.1],
        np.arange(1, 5, 2),
        (0,),
        cache_dir=user_package / "ref",
    )["methods"]
    assert got["if harm"] == want["if harm"] and got["none"] == want["none"]
    result = CliRunner().invoke(app, ["counterfactual", *REFS])
    assert result.exit_code == 2 and "--train-fn" in result.output
