"""`etda counterfactual` and `etda clean`: retrain without the examples a ranking picks."""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from etda.cli._app import (
    AddressOpt,
    EnsembleOpt,
    ExecutorOpt,
    ModelDirOpt,
    ProgressOpt,
    SettingOpt,
    ThreadsOpt,
    WorkersOpt,
    _method_cb,
    _out,
    _user_errors,
    app,
)
from etda.experiment import set_threads

MethodsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        "-m",
        help="Method(s) whose scores rank the training examples; repeat for several (default: if).",
    ),
]
MembersOpt = Annotated[
    int | None, typer.Option(help="Ensemble members (default: the ensemble's own).")
]
SeedsOpt = Annotated[int, typer.Option(min=1, help="Retraining seeds per removal.")]
CacheOpt = Annotated[
    str | None,
    typer.Option(
        "--cache", help="Cache of retrained models (default: $ETDA_CACHE_DIR/retrain-cache)."
    ),
]
ModelRefOpt = Annotated[
    str | None, typer.Option("--model", help="Your trained model: pkg.module:name, instead of -s.")
]
TrainRefOpt = Annotated[
    str | None, typer.Option("--train", help="Your training data: pkg.module:name.")
]
TestRefOpt = Annotated[str | None, typer.Option("--test", help="Your test data: pkg.module:name.")]
TrainFnOpt = Annotated[
    str | None,
    typer.Option(
        "--train-fn",
        help="With --model: train_fn(x, y, seed) -> a trained model, retrained without the "
        "removed examples.",
    ),
]
TaskRefOpt = Annotated[
    str | None, typer.Option("--task", help="Your task object: pkg.module:name.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.", metavar="")]


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 100 for v in values):
        raise typer.BadParameter(f"{what} must be percentages in (0, 100), got {text!r}")
    return values


def _methods(methods: list[str] | None) -> list[str]:
    return [_method_cb(m) for m in (methods or ["if"])]


def _user_retrainer(refs: dict) -> Any:
    from etda.usercode import UserSetting, build, load_object

    missing = [f"--{k.replace('_', '-')}" for k in ("train", "test", "train_fn") if not refs[k]]
    if missing:
        raise ValueError(f"--model needs {', '.join(missing)} (pkg.module:name references)")
    task = None if refs["task"] is None else build(refs["task"])
    name = refs["model"].replace(":", "-").replace("/", "-")
    return UserSetting(
        name, load_object(refs["train_fn"]), build(refs["train"]), build(refs["test"]), task
    )


def _scores(
    setting: Any,
    refs: dict,
    methods: list[str],
    ensemble: str,
    members: int | None,
    model_dir: Any,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Each method's scores (n_test, n_train) on a built-in setting or the user's code."""
    from etda.experiment import run_attribution

    out = {}
    for method in methods:
        if refs["model"] is not None:
            from etda.cli.attribute import _attribute_user_code

            opts = {} if members is None else {"members": members}
            s = _attribute_user_code(refs, method, {}, opts, ensemble, progress=progress)
        else:
            s, _ = run_attribution(
                setting,
                method,
                ensemble,
                1,
                members=members,
                model_dir=model_dir,
                progress=progress,
            )
        label = method if ensemble == "none" else f"{method} + {ensemble}"
        out[label] = np.asarray(s.values, np.float64)
    return out


@app.command()
def counterfactual(
    setting: SettingOpt = "fmnist-mlp",
    method: MethodsOpt = None,
    ensemble: EnsembleOpt = "none",
    members: MembersOpt = None,
    tests: Annotated[int, typer.Option(min=1, help="Test examples, spread over the test set.")] = 8,
    percent: Annotated[
        str, typer.Option(help="Removal sizes, % of the training set, comma-separated.")
    ] = "0.5,2,10",
    seeds: SeedsOpt = 2,
    neighbours: Annotated[
        bool, typer.Option("--neighbours/--no-neighbours", help="Nearest-neighbour baseline.")
    ] = True,
    model_ref: ModelRefOpt = None,
    train_ref: TrainRefOpt = None,
    test_ref: TestRefOpt = None,
    train_fn_ref: TrainFnOpt = None,
    task_ref: TaskRefOpt = None,
    executor: ExecutorOpt = "process",
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    cache: CacheOpt = None,
    model_dir: ModelDirOpt = None,
    progress: ProgressOpt = True,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Remove each test example's top proponents, retrain, and count how often its prediction
    flips (and how far its margin drops) beside removing random or nearest-neighbour examples.
    Retrained models are cached: a rerun (or an interrupted run) trains only what is missing."""
    from etda.evaluate.counterfactual import RANDOM
    from etda.evaluate.counterfactual import counterfactual as run

    set_threads(threads)
    percents = _floats(percent, "--percent")
    refs = _refs(model_ref, train_ref, test_ref, train_fn_ref, task_ref)
    with _user_errors():
        target = _target(setting, refs)
        scores = _scores(target, refs, _methods(method), ensemble, members, model_dir, progress)
        baselines = [RANDOM] + (["neighbours"] if neighbours else [])
        out = run(
            target,
            scores,
            tests,
            percents,
            tuple(range(seeds)),
            baselines,
            cache_dir=cache,
            executor=_executor(executor, refs),
            workers=workers,
            address=address,
            progress=progress,
        )
    if json_out:
        typer.echo(json.dumps({"setting": target.name, **out}))
        return
    table = Table(
        title=f"{target.name}: prediction flip rate / margin drop over {len(out['tests'])} test "
        f"examples x {seeds} seed(s)"
    )
    table.add_column("removed by")
    for k, p in zip(out["ks"], out["percents"], strict=True):
        table.add_column(f"top {k} ({p:.3g} %)")
    for name, per_k in out["methods"].items():
        table.add_row(
            name,
            *(
                f"{per_k[str(k)]['flip_rate']:.2f} / {per_k[str(k)]['margin_drop']:+.2f}"
                for k in out["ks"]
            ),
        )
    con = _out()
    con.print(table)
    c = out["costs"]
    con.print(
        f"{c['models']} models ({c['cached']} cached, {c['trained']} trained now, "
        f"{c['train_seconds']:.0f} s of training); cache {c['cache']}"
    )


@app.command()
def clean(
    setting: SettingOpt = "fmnist-mlp",
    method: MethodsOpt = None,
    ensemble: EnsembleOpt = "none",
    members: MembersOpt = None,
    percent: Annotated[
        str, typer.Option(help="Fractions removed, % of the training set, comma-separated.")
    ] = "2,5,10",
    noise: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Built-in settings: fraction of labels flipped.")
    ] = 0.0,
    seeds: SeedsOpt = 2,
    model_ref: ModelRefOpt = None,
    train_ref: TrainRefOpt = None,
    test_ref: TestRefOpt = None,
    train_fn_ref: TrainFnOpt = None,
    task_ref: TaskRefOpt = None,
    executor: ExecutorOpt = "process",
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    cache: CacheOpt = None,
    model_dir: ModelDirOpt = None,
    progress: ProgressOpt = True,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Data cleaning: rank training examples by their summed harm to half of the test set
    (validation), remove the most harmful fraction, retrain, and report accuracy and loss on
    the other half, beside removing random and high-loss examples."""
    from etda.detect import loss_scores
    from etda.evaluate.counterfactual import cleaning_effects, harm_ranking, validation_split

    set_threads(threads)
    fractions = [p / 100 for p in _floats(percent, "--percent")]
    refs = _refs(model_ref, train_ref, test_ref, train_fn_ref, task_ref)
    with _user_errors():
        target = _target(setting, refs, noise)
        scores = _scores(target, refs, _methods(method), ensemble, members, model_dir, progress)
        data = target.data()
        val, held = validation_split(data.n_test)
        rankings: dict[str, np.ndarray | None] = {
            f"{name} harm": harm_ranking(s, val) for name, s in scores.items()
        }
        rankings["random"] = None
        rankings["training loss"] = loss_scores(
            _model(target, refs, model_dir), data.x_train, data.y_train
        )
        out = cleaning_effects(
            target,
            rankings,
            fractions,
            held,
            tuple(range(seeds)),
            cache_dir=cache,
            executor=_executor(executor, refs),
            workers=workers,
            address=address,
            progress=progress,
        )
    if json_out:
        typer.echo(json.dumps({"setting": target.name, **out}))
        return
    none = out["methods"]["none"]["0"]
    table = Table(
        title=f"{target.name}: accuracy / loss on {len(held)} held-out test examples "
        f"(nothing removed: {none['accuracy']:.3f} / {none['loss']:.3f})"
    )
    table.add_column("removed by")
    for f in fractions:
        table.add_column(f"{f:.1%}")
    for name, per in out["methods"].items():
        if name != "none":
            table.add_row(
                name,
                *(
                    f"{per[f'{f:g}']['accuracy']:.3f} / {per[f'{f:g}']['loss']:.3f}"
                    for f in fractions
                ),
            )
    con = _out()
    con.print(table)
    c = out["costs"]
    con.print(
        f"{c['models']} models ({c['cached']} cached, {c['trained']} trained now, "
        f"{c['train_seconds']:.0f} s of training); cache {c['cache']}"
    )


def _refs(
    model: str | None, train: str | None, test: str | None, train_fn: str | None, task: str | None
) -> dict:
    """The user-code references of a command (None: a built-in setting)."""
    return {"model": model, "train": train, "test": test, "train_fn": train_fn, "task": task}


def _target(setting: str, refs: dict, noise: float = 0.0) -> Any:
    """What is retrained: the user's code (--model ... --train-fn) or a built-in setting
    (with ``noise`` of its labels flipped, seed 0)."""
    if refs["model"] is not None:
        if noise:
            raise ValueError("--noise flips a built-in setting's labels; flip your own data")
        return _user_retrainer(refs)
    from etda.settings import get_setting

    if not noise:
        return get_setting(setting)
    from etda.evaluate.mislabel import noisy_setting

    return noisy_setting(setting, noise, 0)


def _model(target: Any, refs: dict, model_dir: Any) -> Any:
    if refs["model"] is not None:
        from etda.usercode import build

        return build(refs["model"])
    from etda.zoo import trained_models

    return trained_models(target, 1, model_dir, progress=False)[0].model


def _executor(executor: str, refs: dict) -> str:
    """User code retrains in process (its functions need not be importable by workers)."""
    return "inprocess" if refs["model"] is not None else executor
