"""The ``etda`` command: attribute, measure LDS, train models and list settings."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from etda import __version__
from etda.config import AttributeConfig
from etda.detect import DETECTORS
from etda.ensemble import ENSEMBLES
from etda.experiment import (
    PROJECTIONS,
    accuracy,
    build_ground_truth,
    damping_summary,
    default_members,
    default_out_dir,
    parse_damping,
    run_attribution,
    set_threads,
)
from etda.features.curvature import CURVATURES, FISHERS
from etda.features.store import CorruptStoreError, StaleStoreError, StoreLockedError
from etda.io import fmt_seconds, human_bytes, parse_seconds, parse_size
from etda.methods import METHODS, method_takes
from etda.parallel import EXECUTORS
from etda.paths import cache_path
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


# --------------------------------------------------------------------------- commands


@app.command()
def attribute(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            callback=_toml_defaults,
            is_eager=True,
            help="A TOML file whose keys are this command's options (model, train, test, "
            "method, ensemble, members, ...); options on the command line win.",
        ),
    ] = None,
    model_ref: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Your model: pkg.module:name or file.py:name (a module, or a factory that "
            "returns one or a list). With --train/--test instead of a built-in --setting.",
        ),
    ] = None,
    train_ref: Annotated[
        str | None,
        typer.Option("--train", help="Your training data: pkg.module:name (or a factory)."),
    ] = None,
    test_ref: Annotated[
        str | None,
        typer.Option("--test", help="Your test data: pkg.module:name (or a factory)."),
    ] = None,
    task_ref: Annotated[
        str | None,
        typer.Option("--task", help="Your task: pkg.module:name (default: from the targets)."),
    ] = None,
    train_fn_ref: Annotated[
        str | None,
        typer.Option(
            "--train-fn",
            help="With --model and --lds: train_fn(x, y, seed) -> a trained model, retrained "
            "on random subsets for the LDS ground truth (in this process).",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary instead of tables.", metavar="")
    ] = False,
    setting: SettingOpt = "fmnist-mlp",
    method: MethodOpt = "trak",
    ensemble: EnsembleOpt = "none",
    models: ModelsOpt = 1,
    members: Annotated[
        int | None,
        typer.Option(
            "--members",
            "-M",
            callback=_positive_cb,
            help="Members per model (M); checkpoints: checkpoints per run. Default: "
            + ", ".join(f"{k} {p.default_members}" for k, p in ENSEMBLES.items() if k != "none")
            + ".",
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(callback=_positive_cb, help="LoRA rank (default 8).")
    ] = None,
    lora_epochs: Annotated[
        int | None,
        typer.Option(
            callback=_positive_cb, help="LoRA fine-tuning epochs per adapter (default 2)."
        ),
    ] = None,
    p: Annotated[
        float | None,
        typer.Option("--p", help="Dropout-ensemble rate override (default: the model's rate)."),
    ] = None,
    checkpoints: Annotated[
        int, typer.Option(callback=_positive_cb, help="TracIn: checkpoints per run.")
    ] = 5,
    proj_dim: Annotated[
        int | None,
        typer.Option(callback=_positive_cb, help="Projection dimension (default: auto)."),
    ] = None,
    projection: Annotated[
        str,
        typer.Option(
            callback=_projection_cb,
            autocompletion=lambda: list(PROJECTIONS),
            help=f"Featurizer: {' | '.join(PROJECTIONS)} (auto: exact kernel while n fits).",
        ),
    ] = "auto",
    damping: Annotated[
        str | None,
        typer.Option(
            callback=_damping_cb,
            help="TRAK/IF damping: auto (spectral mean) | gcv | FLOAT | trace:C (C x auto).",
        ),
    ] = None,
    curvature: Annotated[
        str,
        typer.Option(
            callback=_curvature_cb,
            autocompletion=lambda: ["gram", *CURVATURES],
            help="IF curvature: gram (exact Gram solve) | kfac | ekfac (Kronecker-factored "
            "Fisher, fitted per member).",
        ),
    ] = "gram",
    fisher: Annotated[
        str,
        typer.Option(
            callback=_fisher_cb,
            autocompletion=lambda: list(FISHERS),
            help="K-FAC/EK-FAC Fisher: sampled (labels drawn from the model) | empirical.",
        ),
    ] = "sampled",
    seed: Annotated[int, typer.Option(help="Seed of projections, masks and adapters.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where the scores are saved (default runs/attribute/<setting>-<method>-...)."
        ),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Feature store directory (persistent, resumable).")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Recompute only the stored feature rows that fail their checksum (instead "
            "of refusing a damaged --store).",
            metavar="",
        ),
    ] = False,
    model_dir: ModelDirOpt = None,
    lds_on: Annotated[
        bool,
        typer.Option(
            "--lds/--no-lds",
            help="Measure the LDS (retrains the setting's models on subsets; cached).",
            metavar="",
        ),
    ] = False,
    n_subsets: NSubsetsOpt = 50,
    fraction: FractionOpt = 0.5,
    seeds_per_subset: SeedsPerSubsetOpt = 1,
    lds_cache: LdsCacheOpt = None,
    executor: ExecutorOpt = "process",
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    top: Annotated[
        int, typer.Option(min=0, help="Show proponents/opponents of the first TOP test examples.")
    ] = 3,
    top_k: Annotated[
        int, typer.Option(min=1, help="Proponents and opponents shown per test example.")
    ] = 3,
    max_memory: Annotated[
        str,
        typer.Option(
            help="Memory the run may use, e.g. 2GB; beyond it, scoring streams block by block."
        ),
    ] = "2GB",
    storage: Annotated[
        str,
        typer.Option(
            callback=_storage_cb,
            autocompletion=lambda: ["float32", "float16", "bfloat16"],
            help="Stored feature precision: float32 | float16 | bfloat16.",
        ),
    ] = "float32",
    scores_out: Annotated[
        Path | None,
        typer.Option(
            help="Write the (n_test, n_train) scores to this .npy file block by block "
            "(out-of-core; top-k kept in memory)."
        ),
    ] = None,
    featurize_executor: Annotated[
        str | None,
        typer.Option(
            callback=_featurize_executor_cb,
            help="Where members and training shards are featurized: inprocess | process | "
            "ray (default: ray with --executor ray, else inprocess).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Attribute a setting's test predictions to its training examples; print costs and LDS."""
    if damping is not None and not method_takes(method, "damping"):
        raise typer.BadParameter(f"method {method!r} has no damping", param_hint="--damping")
    method_options = {}
    if curvature != "gram" or fisher != "sampled":
        if not method_takes(method, "curvature"):
            raise typer.BadParameter(
                f"method {method!r} has no curvature option (use -m if)", param_hint="--curvature"
            )
        method_options = {"curvature": curvature, "fisher": fisher}
    if model_ref is not None:
        if lds_on and train_fn_ref is None:
            raise typer.BadParameter(
                "the LDS of your own model needs its training function: pass --train-fn "
                "pkg.module:train_fn (train_fn(x, y, seed) -> model)",
                param_hint="--lds",
            )
        set_threads(threads)
        with _user_errors():
            scores = _attribute_user_code(
                {"model": model_ref, "train": train_ref, "test": test_ref, "task": task_ref},
                method,
                {**method_options, **({} if damping is None else {"damping": damping})},
                {"members": members, "p": p, "rank": rank, "lora_epochs": lora_epochs},
                ensemble,
                proj_dim=proj_dim,
                projection=projection,
                seed=seed,
                store=store,
                progress=progress,
                memory_budget=_bytes_option(max_memory, "--max-memory"),
                storage=storage,
                scores_out=scores_out,
                top_k=max(top_k, 10),
            )
            lds_info = None
            if lds_on:
                lds_info = _user_lds(
                    scores,
                    model_ref,
                    train_fn_ref,
                    train_ref,
                    test_ref,
                    task_ref,
                    _lds_config(n_subsets, fraction, seeds_per_subset),
                    lds_cache,
                    progress,
                )
        if out is not None:
            scores.save(out)
        _print_user_summary(scores, out, top, top_k, json_out, lds_info)
        return
    lds_config = _lds_config(n_subsets, fraction, seeds_per_subset) if lds_on else None
    out = out or default_out_dir(setting, method, ensemble, models, members, seed)
    set_threads(threads)
    with _user_errors():
        # the attribution options alone, checked before any model is trained
        AttributeConfig(proj_dim=proj_dim, projection=projection, storage=storage, repair=repair)
        scores, result = run_attribution(
            setting,
            method,
            ensemble,
            models,
            members=members,
            p=p,
            rank=rank,
            lora_epochs=lora_epochs,
            n_checkpoints=checkpoints,
            proj_dim=proj_dim,
            projection=projection,
            damping=parse_damping(damping),
            seed=seed,
            store=store,
            progress=progress,
            model_dir=model_dir,
            lds_config=lds_config,
            lds_cache_dir=lds_cache,
            executor=executor,
            workers=workers,
            address=address,
            method_options=method_options,
            attribute_options={
                "memory_budget": _bytes_option(max_memory, "--max-memory"),
                "storage": storage,
                "scores_out": scores_out,
                "repair": repair,
                "top_k": max(top_k, 10),
                "executor": featurize_executor or ("ray" if executor == "ray" else "inprocess"),
                "workers": workers,
                "address": address,
            },
        )
    scores.save(out)
    if json_out:
        from etda.usercode import dumps, summary

        info = summary(scores, out, top, top_k)
        info["lds"] = None if result is None else {"mean": result.mean, "sem": result.sem}
        typer.echo(dumps(info))
        return
    _print_summary(scores, result, out, top, top_k)


def _attribute_user_code(
    refs: dict,
    method: str,
    method_options: dict,
    ensemble_options: dict,
    ensemble: str,
    **attribute_options,
):
    """``etda.attribute`` on the user's model, data and task named by ``refs``."""
    import etda
    from etda.experiment import make_ensemble
    from etda.usercode import build

    if refs["train"] is None or refs["test"] is None:
        raise ValueError("--model needs --train and --test (pkg.module:name references)")
    if "damping" in method_options:
        method_options = {**method_options, "damping": parse_damping(method_options["damping"])}
    return etda.attribute(
        build(refs["model"]),
        train=build(refs["train"]),
        test=build(refs["test"]),
        method=etda.get_method(method, **method_options),
        ensemble=make_ensemble(ensemble, **ensemble_options),
        task=None if refs["task"] is None else build(refs["task"]),
        **attribute_options,
    )


def _user_lds(
    scores, model_ref, train_fn_ref, train_ref, test_ref, task_ref, config, cache, progress
) -> dict:
    """The LDS of scores on the user's data, retraining ``train_fn`` on random subsets."""
    from etda.evaluate.lds import ground_truth, lds
    from etda.usercode import UserSetting, build, load_object

    task = None if task_ref is None else build(task_ref)
    retrainer = UserSetting(
        model_ref.replace(":", "-").replace("/", "-"),
        load_object(train_fn_ref),
        build(train_ref),
        build(test_ref),
        task,
    )
    gt = ground_truth(retrainer, config, cache, executor="inprocess", progress=progress)
    result = lds(scores.values, gt)
    info = {"mean": result.mean, "sem": result.sem, "config": config.to_dict()}
    scores.config["lds"] = info
    return info


def _print_user_summary(
    scores, out: Path | None, top: int, top_k: int, as_json: bool, lds_info: dict | None = None
) -> None:
    from etda.usercode import dumps, summary

    info = summary(scores, out, top, top_k)
    info["lds"] = lds_info
    if as_json:
        typer.echo(dumps(info))
        return
    con = _out()
    con.print(
        f"[bold]{escape(info['method'])}[/bold] · ensemble {escape(str(info['ensemble']))} "
        f"({info['members']} member(s)) · task {escape(info['task'])}"
    )
    where = escape(str(out)) if out is not None else "not saved (pass --out DIR)"
    con.print(f"scores: {info['n_test']} test x {info['n_train']} train -> {where}")
    if lds_info is not None:
        con.print(f"LDS {lds_info['mean']:.3f} ± {lds_info['sem']:.3f}")
    c = scores.costs
    con.print(
        f"serve {c.serve_s:.2f} s (featurize {c.featurize_train_s + c.featurize_test_s:.2f} s, "
        f"score {c.score_s:.2f} s), {human_bytes(c.bytes)}"
    )
    table = Table(title=f"top {top_k} proponents (+) and opponents (-)")
    for col in ("test", "proponents #train: score", "opponents #train: score"):
        table.add_column(col)
    for row in info["top"]:
        table.add_row(
            str(row["test"]),
            "\n".join(f"#{j} {v:+.3g}" for j, v in row["proponents"]),
            "\n".join(f"#{j} {v:+.3g}" for j, v in row["opponents"]),
        )
    con.print(table)


def _print_summary(scores, result, out: Path, top: int, top_k: int) -> None:
    from etda.settings import get_setting

    con = _out()
    cfg, costs = scores.config, scores.costs
    n_test, n_train = scores.shape
    n_members = len(cfg.get("members", []))
    models = cfg.get("models", [])
    con.print(
        f"[bold]{escape(cfg['setting']['name'])}[/bold] · {escape(scores.method)} · ensemble "
        f"{escape(cfg.get('ensemble_kind', '?'))} ({len(models)} model(s), {n_members} member(s))"
    )
    con.print(f"scores: {n_test} test x {n_train} train -> {escape(str(out))}")
    if cfg.get("out_of_core"):
        where = getattr(scores.values, "filename", None) or "memory"
        con.print(
            f"out of core: budget {human_bytes(cfg['memory_budget'])}, blocks of "
            f"{cfg['score_block']} training columns, scores in {escape(str(where))}, "
            f"features stored as {cfg['storage']}"
        )
    elif cfg.get("storage", "float32") != "float32":
        con.print(f"features stored as {cfg['storage']}")
    proj = cfg.get("projection")
    proj_text = f"{proj}, k = {cfg['proj_dim']}" if cfg.get("proj_dim") else f"{proj}"
    if proj == "none":
        proj_text += " (exact gradient kernel)"
    con.print(f"projection: {escape(proj_text)}")
    damp = damping_summary(scores)
    if damp:
        con.print(f"damping: {escape(damp)}")
    if cfg.get("checkpoint_epochs"):
        con.print(f"checkpoint epochs: {cfg['checkpoint_epochs']}")

    table = Table(title="costs", title_justify="left", show_header=True, header_style="bold")
    table.add_column("cost")
    table.add_column("value", justify="right")
    table.add_column("detail")
    cached = sum(m["cached"] for m in models)
    model_s = sum(m["train_s"] for m in models)
    detail = f"{len(models)} model(s) {model_s:.2f} s"
    if cached:
        detail += f" ({cached} loaded from cache: original training time)"
    if costs.train_s - model_s > 1e-9:
        detail += f" + members {costs.train_s - model_s:.2f} s (e.g. adapter fine-tuning)"
    table.add_row("train", f"{costs.train_s:.2f} s", detail)
    table.add_row(
        "serve",
        f"{costs.serve_s:.2f} s",
        f"featurize train {costs.featurize_train_s:.2f} s, test {costs.featurize_test_s:.2f} s, "
        f"score {costs.score_s:.2f} s",
    )
    table.add_row(
        "space",
        human_bytes(costs.bytes),
        f"weights {human_bytes(costs.weights_bytes)}, features {human_bytes(costs.feature_bytes)}",
    )
    table.add_row("FLOPs", f"{costs.flops:.3g}", "counted forward/backward passes")
    con.print(table)

    if result is not None:
        info = cfg.get("lds", {})
        con.print(
            f"[bold]LDS {result.mean:.4f} ± {result.sem:.4f}[/bold] "
            f"({info.get('config', {}).get('n_subsets', '?')} subsets; ground truth "
            f"{info.get('jobs_cached', '?')} cached / {info.get('jobs_trained', '?')} trained now)"
        )

    if top > 0:
        data = get_setting(cfg["setting"]["name"]).data()
        names = data.class_names

        def label(y: int) -> str:
            return f"{y} {names[y]}" if names and names[y] != str(y) else str(y)

        t = Table(
            title=f"top {top_k} proponents (+) and opponents (-)",
            title_justify="left",
            header_style="bold",
        )
        for col in (
            "test",
            "label",
            "proponents #train (label) score",
            "opponents #train (label) score",
        ):
            t.add_column(col)
        y_train = data.y_train.tolist()
        for row in scores.top(top_k)[:top]:
            ti = row["test"]

            def fmt(pairs: list) -> str:
                return "\n".join(f"#{i} ({label(y_train[i])}) {s:+.3g}" for i, s in pairs)

            t.add_row(
                str(ti),
                escape(label(int(data.y_test[ti])) if data.y_test.ndim == 1 else "(sequence)"),
                escape(fmt(row["proponents"])),
                escape(fmt(row["opponents"])),
            )
        con.print(t)


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
def mislabel(
    setting: SettingOpt = "fmnist-mlp",
    model_ref: Annotated[
        str | None,
        typer.Option("--model", help="Your (trained) model: pkg.module:name, instead of -s."),
    ] = None,
    train_ref: Annotated[
        str | None, typer.Option("--train", help="Your training data (x, y): pkg.module:name.")
    ] = None,
    checkpoints_ref: Annotated[
        str | None,
        typer.Option(
            "--checkpoints", help="Your run's checkpoint models (a list): pkg.module:name."
        ),
    ] = None,
    detector: Annotated[
        str,
        typer.Option(
            callback=lambda v: _choice(v, ("auto", *DETECTORS), "detector"),
            help="auto (the loss over --checkpoints when given; else self-influence when the "
            "model fits most labels, the loss otherwise) | loss | aum | self-influence | "
            "loss-normalized | fusion.",
        ),
    ] = "auto",
    method: MethodOpt = "if",
    fraction: Annotated[
        float, typer.Option(help="Built-in settings: the fraction of labels flipped.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the flipped labels.")] = 0,
    top: Annotated[int, typer.Option(min=1, help="Most suspicious examples shown.")] = 10,
    model_dir: ModelDirOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.", metavar="")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Find mislabelled training examples. Built-in settings: flip a seeded fraction of the
    labels, train, and report every detector's ROC-AUC beside the loss and random baselines;
    your own code (--model/--train): rank your training examples by the chosen detector."""
    import json

    set_threads(threads)
    with _user_errors():
        if model_ref is not None:
            _mislabel_user(model_ref, train_ref, checkpoints_ref, detector, method, top, json_out)
            return
        from etda.evaluate.mislabel import run_mislabel

        rep = run_mislabel(setting, method, "none", fraction, seed, model_dir=model_dir)
    names = ["self_influence", "loss", "loss_checkpoints", "aum_checkpoints", "fusion", "random"]
    rows = {n: {"auc": rep[n]["auc"], "found_at": rep[n]["found_at"]} for n in names}
    if json_out:
        typer.echo(json.dumps({"setting": setting, "memorized": rep["memorized"], **rows}))
        return
    table = Table(title=f"{setting}: {rep['n_flipped']} of {rep['n_train']} labels flipped")
    for col in ("detector", "ROC-AUC", "found in top 10 %"):
        table.add_column(col)
    for n in names:
        table.add_row(
            n.replace("_", " "), f"{rows[n]['auc']:.3f}", f"{rows[n]['found_at']['10%']:.0%}"
        )
    _out().print(table)
    _out().print(f"the model fits {rep['memorized']:.0%} of the flipped labels")


def _mislabel_user(model_ref, train_ref, checkpoints_ref, detector, method, top, json_out):
    import json

    import numpy as np

    from etda.detect import choose_detector, mislabel_scores
    from etda.sources import as_tensors
    from etda.usercode import build

    if train_ref is None:
        raise ValueError("--model needs --train (pkg.module:name of (x, y) or a Dataset)")
    model = build(model_ref)
    x, y = as_tensors(build(train_ref), "train")
    ckpts = build(checkpoints_ref) if checkpoints_ref else None
    chosen = choose_detector(model, x, y, ckpts) if detector == "auto" else detector
    scores = mislabel_scores(chosen, model, x, y, checkpoints=ckpts, method=method)
    order = np.argsort(-scores, kind="stable")[:top]
    out = {"detector": chosen, "top": [[int(i), float(scores[i])] for i in order]}
    if json_out:
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"most suspicious training examples ({chosen})")
    table.add_column("#train")
    table.add_column("label")
    table.add_column("score")
    for i, v in out["top"]:
        table.add_row(str(i), str(y[i].tolist()), f"{v:.4g}")
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


# ------------------------------------------------------------------ bench and report


@app.command()
def bench(
    setting: SettingOpt = "fmnist-mlp",
    quick: Annotated[
        bool, typer.Option("--quick", help="A small sweep that runs in a few minutes.", metavar="")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Results folder (default benchmarks/results/<setting>[-quick])."),
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
        typer.Option(help="LDS: random training subsets (default: the sweep's, 50; kjv 40)."),
    ] = None,
    fraction: FractionOpt = 0.5,
    seeds_per_subset: Annotated[
        int | None,
        typer.Option(min=1, help="LDS: models per subset (default: the sweep's, 1; kjv 2)."),
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
    sweep = get_sweep(quick, wanted, setting)
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


def main() -> None:  # pragma: no cover - `python -m etda.cli`
    app(prog_name="etda")


# ----------------------------------------------------------------------------- explain
# Kept after the rest on purpose (a self-contained addition); `etda explain` is registered
# when the module is imported, which is how the `etda` entry point runs.


@app.command()
def explain(
    saved: Annotated[
        Path | None,
        typer.Option(
            "--scores",
            help="Explain saved scores of your own data (a folder from etda attribute --out) "
            "instead of a setting; with --train (and --test, --decode) references.",
        ),
    ] = None,
    train_ref: Annotated[
        str | None, typer.Option("--train", help="With --scores: your training data reference.")
    ] = None,
    test_ref: Annotated[
        str | None, typer.Option("--test-data", help="With --scores: your test data reference.")
    ] = None,
    decode_ref: Annotated[
        str | None,
        typer.Option("--decode", help="With --scores: decode(x) -> str for text inputs."),
    ] = None,
    setting: SettingOpt = "kjv-transformer",
    test: Annotated[int, typer.Option("--test", "-t", min=0, help="Test example to explain.")] = 0,
    prompt: Annotated[
        str | None,
        typer.Option(help="Sequence settings: generate from this prompt, explain the result."),
    ] = None,
    length: Annotated[
        int | None,
        typer.Option(
            callback=_positive_cb,
            help="Characters to generate (default: enough to fill one training window).",
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature (0: greedy); seeded by --seed.")
    ] = 0.8,
    method: MethodOpt = "trak",
    ensemble: EnsembleOpt = "none",
    models: ModelsOpt = 1,
    members: Annotated[
        int | None,
        typer.Option("--members", "-M", callback=_positive_cb, help="Members per model (M)."),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Proponents and opponents shown.")] = 5,
    proj_dim: Annotated[
        int | None,
        typer.Option(callback=_positive_cb, help="Projection dimension (default: auto)."),
    ] = None,
    projection: Annotated[
        str,
        typer.Option(
            callback=_projection_cb,
            autocompletion=lambda: list(PROJECTIONS),
            help=f"Featurizer: {' | '.join(PROJECTIONS)} (auto; sequence settings: factored "
            "with k = 2048).",
        ),
    ] = "auto",
    damping: Annotated[
        str | None,
        typer.Option(callback=_damping_cb, help="TRAK/IF damping: auto | gcv | FLOAT | trace:C."),
    ] = None,
    p: Annotated[float | None, typer.Option("--p", help="Dropout-ensemble rate override.")] = None,
    rank: Annotated[
        int | None, typer.Option(callback=_positive_cb, help="LoRA rank (default 8).")
    ] = None,
    lora_epochs: Annotated[
        int | None,
        typer.Option(
            callback=_positive_cb, help="LoRA fine-tuning epochs per adapter (default 2)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of projections, masks, adapters, sampling.")] = 0,
    png: Annotated[
        Path | None,
        typer.Option(help="Image settings: where the PNG grid goes (default runs/explain/...)."),
    ] = None,
    model_dir: ModelDirOpt = None,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = False,
) -> None:
    """Show the training examples that most support (+) and oppose (-) one test prediction,
    or a generated continuation of --prompt (sequence settings); image settings also get a
    PNG grid."""
    from etda.explain import explain as run_explain
    from etda.explain import render_png, render_text

    if saved is not None:
        with _user_errors():
            _explain_saved(saved, train_ref, test_ref, decode_ref, test, top_k, png)
        return
    if damping is not None and not method_takes(method, "damping"):
        raise typer.BadParameter(f"method {method!r} has no damping", param_hint="--damping")
    set_threads(threads)
    with _user_errors():
        e = run_explain(
            setting,
            test,
            prompt=prompt,
            length=length,
            temperature=temperature,
            method=method,
            ensemble=ensemble,
            members=members,
            k_models=models,
            top_k=top_k,
            projection=projection,
            proj_dim=proj_dim,
            damping=damping,
            p=p,
            rank=rank,
            lora_epochs=lora_epochs,
            seed=seed,
            model_dir=model_dir,
            progress=progress,
        )
        typer.echo(render_text(e))
        if e.test.text is None:  # an image setting
            m = members if members is not None else default_members(ensemble)
            path = png or cache_path("explain") / (
                f"{setting}-test{test}-{method}-{ensemble}-k{models}-m{m}-s{seed}.png"
            )
            typer.echo(f"image grid: {render_png(e, path)}")


def _explain_saved(saved, train_ref, test_ref, decode_ref, index, top_k, png) -> None:
    from etda.explain import explain_saved, render_png, render_text
    from etda.scores import Scores
    from etda.usercode import build, load_object

    if train_ref is None:
        raise ValueError("--scores needs --train (the data the scores were computed on)")
    e = explain_saved(
        Scores.load(saved),
        build(train_ref),
        None if test_ref is None else build(test_ref),
        index,
        top_k,
        None if decode_ref is None else load_object(decode_ref),
    )
    typer.echo(render_text(e, costs=False))
    if e.test.x is not None and png is not None:
        typer.echo(f"image grid: {render_png(e, png)}")


# -------------------------------------------------------------------------------- plan
# Also a self-contained addition: the budget planner over saved benchmark results.

from collections.abc import Callable  # noqa: E402


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
    per-family fits of them (predicted), and explain why."""
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
    rec = p.recommendation
    con.print(f"[bold]recommendation:[/bold] {escape(rec.headline())}")
    con.print(escape(p.explain()), soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
