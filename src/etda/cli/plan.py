"""`etda plan`: the best expected LDS within train/serve/space budgets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from etda.cli._app import (
    MethodOpt,
    SettingOpt,
    _out,
    _user_errors,
    app,
)
from etda.io import fmt_seconds, human_bytes, parse_seconds, parse_size

# -------------------------------------------------------------------------------- plan
# Also a self-contained addition: the budget planner over saved benchmark results.


def _budget_cb(parse: Callable[[str], float]) -> Callable[[str | None], str | None]:
    """A callback that rejects a budget string ``parse`` cannot read (the value stays a
    string; the command parses it)."""

    def check(value: str | None) -> str | None:
        if value is not None:
            try:
                parse(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return check


@app.command()
def plan(
    setting: SettingOpt = "fmnist-mlp",
    budget_train: Annotated[
        str | None,
        typer.Option(
            callback=_budget_cb(parse_seconds),
            help="Training-time budget: 60s, 90 (seconds), 5m, 1.5h (default: none).",
        ),
    ] = None,
    budget_serve: Annotated[
        str | None,
        typer.Option(
            callback=_budget_cb(parse_seconds),
            help="Serving-time budget (featurize + score): 30s, 5m, ... (default: none).",
        ),
    ] = None,
    budget_bytes: Annotated[
        str | None,
        typer.Option(
            callback=_budget_cb(parse_size),
            help="Space budget: 500MB, 2GB, 800KB, 1e9 (bytes; KB = 1024 B as in the "
            "reports) (default: none).",
        ),
    ] = None,
    method: MethodOpt = "trak",
    results: Annotated[
        list[Path] | None,
        typer.Option(
            "--results",
            help="results.json files or folders (repeatable; default benchmarks/results/"
            "<setting> and <setting>-quick; the first listed wins a collision).",
        ),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Feasible candidates shown.")] = 10,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all/--pareto",
            help="Show every feasible candidate, or only those no other one beats on LDS "
            "and every cost (default).",
            metavar="",
        ),
    ] = False,
) -> None:
    """Recommend the ensemble (kind, K, M, proj_dim) with the best expected LDS within
    training, serving and space budgets, from saved benchmark results (measured) and
    per-family fits of them (predicted), and explain why.

    Predictions come from the ensemble-variance theory, LDS(K, M) = rho1 sqrt(K M / (1 +
    (M-1) a_w + M (K-1) a_b)), fitted per family (naive rows: rho1 and a_b; each kind's
    rows: its rho1 and a_w); the a - b/n fit of one size axis only where the theory cannot
    be fitted. Always printed too: the predicted-vs-measured table, one row per measured
    configuration, with the theory's leave-one-out prediction (fitted without that row)
    and its difference from the measurement in measured standard errors."""
    from etda import plan as planner

    con = _out()
    with _user_errors():
        p = planner.plan(
            setting,
            budget_train=None if budget_train is None else parse_seconds(budget_train),
            budget_serve=None if budget_serve is None else parse_seconds(budget_serve),
            budget_bytes=None if budget_bytes is None else parse_size(budget_bytes),
            method=method,
            results=results,
        )
    shown = p.feasible if show_all else p.pareto()
    hidden = "" if show_all else f", {len(p.feasible) - len(shown)} dominated hidden"
    table = Table(
        title=f"{escape(setting)} / {escape(method)}: {len(p.feasible)} of "
        f"{len(p.candidates)} candidates within {escape(p.budgets.describe())} (top {top}"
        f"{hidden})",
        title_justify="left",
        header_style="bold",
    )
    for col, just in (
        ("#", "right"),
        ("configuration", "left"),
        ("K", "right"),
        ("M", "right"),
        ("proj_dim", "left"),
        ("LDS ± s.e.", "right"),
        ("figures", "left"),
        ("train", "right"),
        ("serve", "right"),
        ("space", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for i, c in enumerate(shown[:top], 1):
        table.add_row(
            str(i),
            escape(c.label),
            str(c.models),
            str(c.members),
            escape(c.features),
            f"{c.lds:.4f} ± {c.sem:.4f}",
            c.kind,
            fmt_seconds(c.train_s),
            fmt_seconds(c.serve_s),
            human_bytes(c.bytes),
            style="bold green" if i == 1 else None,
        )
    con.print(table)
    con.print(comparison_table(p))
    rec = p.recommendation
    con.print(f"[bold]recommendation:[/bold] {escape(rec.headline())}")
    con.print(escape(p.explain()), soft_wrap=True)


def comparison_table(p: object) -> Table:
    """The theory's predicted vs measured LDS of every measured configuration of a plan."""
    from etda.plan import comparison_summary

    rows = p.comparison  # type: ignore[attr-defined]
    table = Table(
        title=f"predicted vs measured (variance theory, leave-one-out): "
        f"{escape(comparison_summary(rows))}",
        title_justify="left",
        header_style="bold",
    )
    options = any(c.options for c in rows)
    for col, just in (
        ("configuration", "left"),
        *((("options", "left"),) if options else ()),
        ("K", "right"),
        ("M", "right"),
        ("measured ± s.e.", "right"),
        ("fit", "right"),
        ("predicted (LOO)", "right"),
        ("diff / s.e.", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in rows:
        z = c.z
        table.add_row(
            escape(c.label),
            *((escape(c.options),) if options else ()),
            str(c.models),
            str(c.members),
            f"{c.lds:.4f} ± {c.sem:.4f}",
            "—" if c.fitted is None else f"{c.fitted:.4f}",
            "—" if c.predicted is None else f"{c.predicted:.4f}",
            "—" if z is None else f"{z:+.2f}",
            escape(c.note),
        )
    return table
