"""The ``etda`` application object, its shared options, validators and error handling; the
commands live in their own modules of this package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from etda import __version__
from etda.ensemble import ENSEMBLES
from etda.experiment import (
    PROJECTIONS,
    parse_damping,
)
from etda.features.curvature import CURVATURES, FISHERS
from etda.features.store import CorruptStoreError, StaleStoreError, StoreLockedError
from etda.io import parse_size
from etda.methods import METHODS
from etda.parallel import EXECUTORS
from etda.settings import SETTINGS

app = typer.Typer(
    name="etda",
    help=(
        "[bold]etda[/bold]: efficient training data attribution. Attribute your own model's "
        "test predictions (--model/--train/--test) or a named setting's to the training "
        "examples with any method x ensemble; measure the quality (LDS) and costs."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors caused by the inputs (bad option combinations, missing data, a damaged, stale
    or busy --store): red, exit 2."""
    try:
        yield
    except (
        ValueError,
        FileNotFoundError,
        CorruptStoreError,
        StaleStoreError,
        StoreLockedError,
    ) as exc:
        _err().print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------ validators


def _choice(value: str | None, choices: object, what: str) -> str | None:
    if value is not None and value not in choices:  # type: ignore[operator]
        raise typer.BadParameter(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value


def _setting_cb(value: str) -> str:
    return _choice(value, SETTINGS, "setting")  # type: ignore[return-value]


def _method_cb(value: str) -> str:
    return _choice(value, METHODS, "method")  # type: ignore[return-value]


def _ensemble_cb(value: str) -> str:
    return _choice(value, ENSEMBLES, "ensemble")  # type: ignore[return-value]


def _projection_cb(value: str) -> str:
    return _choice(value, PROJECTIONS, "projection")  # type: ignore[return-value]


def _executor_cb(value: str) -> str:
    return _choice(value, EXECUTORS, "executor")  # type: ignore[return-value]


def _curvature_cb(value: str) -> str:
    return _choice(value, ("gram", *CURVATURES), "curvature")  # type: ignore[return-value]


def _fisher_cb(value: str) -> str:
    return _choice(value, FISHERS, "fisher")  # type: ignore[return-value]


def _toml_defaults(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config FILE``: the file's keys become the defaults of the command's options."""
    if value is None:
        return None
    import tomllib

    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(f"cannot read {value}: {e}", param_hint="--config") from None
    renamed = {"model": "model_ref", "train": "train_ref", "test": "test_ref", "task": "task_ref"}
    names = {p.name for p in ctx.command.params}
    defaults = {}
    for key, v in data.items():
        name = renamed.get(key, key.replace("-", "_"))
        name = {"lds": "lds_on", "json": "json_out"}.get(name, name)
        if name not in names:
            raise typer.BadParameter(f"unknown key {key!r} in {value}", param_hint="--config")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _positive_cb(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be a positive integer, got {value}")
    return value


def _damping_cb(value: str | None) -> str | None:
    try:
        parse_damping(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"etda {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_cb, is_eager=True, help="Show the version.", metavar=""
        ),
    ] = False,
) -> None:
    """etda: efficient training data attribution."""


# --------------------------------------------------------------------- shared options

SettingOpt = Annotated[
    str,
    typer.Option(
        "--setting",
        "-s",
        callback=_setting_cb,
        autocompletion=lambda: list(SETTINGS),
        help="Named setting (see [bold]etda settings[/]).",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        callback=_method_cb,
        autocompletion=lambda: list(METHODS),
        help=f"Method: {' | '.join(METHODS)}.",
    ),
]
EnsembleOpt = Annotated[
    str,
    typer.Option(
        "--ensemble",
        "-e",
        callback=_ensemble_cb,
        autocompletion=lambda: list(ENSEMBLES),
        help=f"Ensemble: {' | '.join(ENSEMBLES)}.",
    ),
]
ModelsOpt = Annotated[
    int,
    typer.Option("--models", "-K", callback=_positive_cb, help="Independently trained models (K)."),
]
RankOpt = Annotated[int | None, typer.Option(callback=_positive_cb, help="LoRA rank (default 8).")]
LoraEpochsOpt = Annotated[
    int | None,
    typer.Option(callback=_positive_cb, help="LoRA fine-tuning epochs per adapter (default 2)."),
]
LoraGradientsOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-gradients",
        help="LoRA features: adapters (the adapter gradients, default) or all (the gradients "
        "of every parameter of the model with the adapters merged in).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(callback=_positive_cb, help="Torch threads (default: torch's choice)."),
]
ProgressOpt = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.", metavar="")
]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option(help="Cache of trained models (default: $ETDA_CACHE_DIR/models, ~/.cache/etda)."),
]
LdsCacheOpt = Annotated[
    Path | None,
    typer.Option(
        help="Cache of LDS ground-truth retrainings (default: $ETDA_CACHE_DIR/lds-cache)."
    ),
]
NSubsetsOpt = Annotated[
    int, typer.Option(help="LDS: random training subsets to retrain on (>= 2).")
]
FractionOpt = Annotated[float, typer.Option(help="LDS: fraction of the training set per subset.")]
SeedsPerSubsetOpt = Annotated[
    int, typer.Option(callback=_positive_cb, help="LDS: models per subset (outputs averaged).")
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        callback=_executor_cb,
        autocompletion=lambda: list(EXECUTORS),
        help=f"Where LDS retraining runs: {' | '.join(EXECUTORS)}.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(callback=_positive_cb, help="Retraining workers (default: one per core)."),
]
AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster address (executor ray), e.g. 'auto'.")
]


def _storage_cb(value: str) -> str:
    from etda.features.store import STORAGE

    if value not in STORAGE:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(STORAGE)}")
    return value


def _featurize_executor_cb(value: str | None) -> str | None:
    if value is not None and value not in EXECUTORS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(EXECUTORS)}")
    return value


def _bytes_option(value: str, flag: str) -> int:
    try:
        n = parse_size(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise typer.BadParameter(f"{value!r} is not a size such as 2GB or 500MB", param_hint=flag)
    return n


def _lds_config(n_subsets: int, fraction: float, seeds_per_subset: int):
    from etda.evaluate.lds import LDSConfig

    try:
        return LDSConfig(n_subsets=n_subsets, fraction=fraction, seeds_per_subset=seeds_per_subset)
    except ValueError as exc:
        msg = str(exc)
        for name in ("n_subsets", "fraction", "seeds_per_subset"):
            if f"LDSConfig.{name}" in msg:
                flag = "--" + name.replace("_", "-")
                msg = msg.replace(f"LDSConfig.{name}", flag)
                raise typer.BadParameter(msg, param_hint=flag) from None
        raise typer.BadParameter(msg) from None
