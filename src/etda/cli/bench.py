"""`etda bench` and `etda report`: benchmark sweeps and their reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from etda.cli._app import (
    AddressOpt,
    ExecutorOpt,
    FractionOpt,
    LdsCacheOpt,
    ModelDirOpt,
    SettingOpt,
    ThreadsOpt,
    WorkersOpt,
    _lds_config,
    _method_cb,
    _out,
    _user_errors,
    app,
)
from etda.experiment import set_threads

# ------------------------------------------------------------------ bench and report


def _regime_cb(value: str) -> str:
    from etda.bench.sweeps import REGIMES

    if value not in REGIMES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(REGIMES)}")
    return value


@app.command()
def bench(
    setting: SettingOpt = "fmnist-mlp",
    quick: Annotated[
        bool, typer.Option("--quick", help="A small sweep that runs in a few minutes.", metavar="")
    ] = False,
    regime: Annotated[
        str,
        typer.Option(
            help="default: etda's regime (exact kernel where it fits, damped); paper: the TRAK "
            "paper's code base's (k = 512 projections seeded per member, no damping, naive "
            "models also on half subsets), TRAK over every seed system.",
            callback=_regime_cb,
        ),
    ] = "default",
    out: Annotated[
        Path | None,
        typer.Option(help="Results folder (default benchmarks/results/<setting>[-quick][-paper])."),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(help="Comma-separated methods to keep, e.g. trak,graddot (default: all)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Rerun configurations already in results.json.", metavar=""),
    ] = False,
    with_mislabel: Annotated[
        bool,
        typer.Option(
            "--mislabel/--no-mislabel", help="Mislabel detection for a few configs.", metavar=""
        ),
    ] = True,
    with_variance: Annotated[
        bool,
        typer.Option(
            "--variance/--no-variance", help="Fit the ensemble-variance theory.", metavar=""
        ),
    ] = True,
    with_report: Annotated[
        bool,
        typer.Option("--report/--no-report", help="Write report.md and the plots.", metavar=""),
    ] = True,
    n_subsets: Annotated[
        int | None,
        typer.Option(help="LDS: random training subsets (default: the sweep's, 50)."),
    ] = None,
    fraction: FractionOpt = 0.5,
    seeds_per_subset: Annotated[
        int | None,
        typer.Option(
            min=1, help="LDS: models per subset (default: the sweep's: 1, text settings 2)."
        ),
    ] = None,
    executor: ExecutorOpt = "process",
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    lds_cache: LdsCacheOpt = None,
    model_dir: ModelDirOpt = None,
    threads: ThreadsOpt = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.", metavar="")
    ] = False,
) -> None:
    """Sweep method x ensemble x size on a setting: LDS, costs, mislabel AUC, variance fit.

    Writes results.json, report.md and PNG plots into OUT.
    Resumable: configurations already in results.json are skipped unless --force.
    """
    from etda.bench.runner import run_bench
    from etda.bench.sweeps import get_sweep

    wanted = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    for m in wanted or []:
        _method_cb(m)
    if quick and regime != "default":
        raise typer.BadParameter("--quick has no paper-regime sweep; drop one of them")
    sweep = get_sweep(quick, wanted, setting, regime)
    config = _lds_config(
        sweep.n_subsets if n_subsets is None else n_subsets,
        fraction,
        sweep.seeds_per_subset if seeds_per_subset is None else seeds_per_subset,
    )
    set_threads(threads)
    con = _out()
    with _user_errors():
        run_bench(
            setting,
            quick,
            out,
            wanted,
            sweep=sweep,
            executor=executor,
            workers=workers,
            address=address,
            force=force,
            model_dir=model_dir,
            lds_cache=lds_cache,
            lds_config=config,
            mislabel=with_mislabel,
            variance=with_variance,
            report=with_report,
            progress=progress,
            log=lambda text: con.print(escape(text), soft_wrap=True),
        )


@app.command()
def report(
    results_dir: Annotated[
        Path, typer.Argument(help="A folder holding results.json (written by etda bench).")
    ],
) -> None:
    """Turn a benchmark's results.json into report.md and PNG plots (Pareto, mislabel,
    variance theory)."""
    from etda.report import write_report

    with _user_errors():
        files = write_report(results_dir)
    for f in files:
        _out().print(escape(str(f)))
