"""`etda lds`, `etda train` and `etda settings`: the built-in settings' ground truths and models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from etda.cli._app import (
    AddressOpt,
    ExecutorOpt,
    FractionOpt,
    LdsCacheOpt,
    ModelDirOpt,
    NSubsetsOpt,
    ProgressOpt,
    SeedsPerSubsetOpt,
    SettingOpt,
    ThreadsOpt,
    WorkersOpt,
    _lds_config,
    _out,
    _positive_cb,
    _user_errors,
    app,
)
from etda.experiment import accuracy, build_ground_truth, set_threads
from etda.settings import SETTINGS


@app.command()
def lds(
    setting: SettingOpt = "fmnist-mlp",
    n_subsets: NSubsetsOpt = 50,
    fraction: FractionOpt = 0.5,
    seeds_per_subset: SeedsPerSubsetOpt = 1,
    executor: ExecutorOpt = "process",
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    lds_cache: LdsCacheOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Build or resume the LDS ground truth (retrained models on random subsets)."""
    config = _lds_config(n_subsets, fraction, seeds_per_subset)
    with _user_errors():
        run = build_ground_truth(setting, config, lds_cache, executor, workers, address, progress)
    con = _out()
    con.print(
        f"[bold]{escape(setting)}[/bold] LDS ground truth: {run.total} jobs "
        f"({config.n_subsets} subsets x {config.seeds_per_subset} seed(s), fraction "
        f"{config.fraction}): {run.cached} cached, {run.trained} trained now"
    )
    con.print(
        f"wall time {run.wall_s:.1f} s; retraining time in the cache "
        f"{run.gt.train_seconds:.1f} s; folder {escape(str(run.gt.path))}"
    )


@app.command()
def train(
    setting: SettingOpt = "fmnist-mlp",
    models: Annotated[
        int, typer.Option("--models", "-K", callback=_positive_cb, help="Models to train (K).")
    ] = 1,
    first_seed: Annotated[int, typer.Option(min=0, help="Seed of the first model.")] = 0,
    model_dir: ModelDirOpt = None,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Train (or load cached) models of a setting; print test accuracy and train seconds."""
    from etda.settings import get_setting
    from etda.zoo import trained_models

    set_threads(threads)
    s = get_setting(setting)
    with _user_errors():
        tms = trained_models(s, models, model_dir, first_seed, progress=progress)
        data = s.data()
    folder = tms[0].path.parent
    table = Table(
        title=f"{setting}: {escape(s.description)}\ncache: {escape(str(folder))}",
        title_justify="left",
        header_style="bold",
    )
    for col, just in (
        ("seed", "right"),
        ("test acc", "right"),
        ("train s", "right"),
        ("source", "left"),
        ("weights", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for tm in tms:
        table.add_row(
            str(tm.seed),
            f"{accuracy(tm.model, data.x_test, data.y_test):.4f}",
            f"{tm.seconds:.2f}",
            "cache" if tm.cached else "trained",
            escape(tm.path.name),
        )
    _out().print(table)


@app.command()
def settings() -> None:
    """List the named settings with their descriptions."""
    table = Table(header_style="bold")
    for col in ("setting", "model", "epochs", "description"):
        table.add_column(col)
    for name, s in SETTINGS.items():
        table.add_row(name, s.model_name, str(s.recipe.epochs), escape(s.description))
    _out().print(table)


from etda.demo import demo as _demo  # noqa: E402  (kept in its own module)

app.command(name="demo")(_demo)
