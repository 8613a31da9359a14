"""`etda attribute`: a built-in setting or the user's own model, data and task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from etda.cli._app import (
    AddressOpt,
    EnsembleOpt,
    ExecutorOpt,
    FractionOpt,
    LdsCacheOpt,
    LoraEpochsOpt,
    LoraGradientsOpt,
    MethodOpt,
    ModelDirOpt,
    ModelsOpt,
    NSubsetsOpt,
    ProgressOpt,
    RankOpt,
    SeedsPerSubsetOpt,
    SettingOpt,
    ThreadsOpt,
    WorkersOpt,
    _bytes_option,
    _curvature_cb,
    _damping_cb,
    _featurize_executor_cb,
    _fisher_cb,
    _lds_config,
    _out,
    _positive_cb,
    _projection_cb,
    _storage_cb,
    _toml_defaults,
    _user_errors,
    app,
)
from etda.config import KERNEL_DTYPES, SOLVE_DTYPES, AttributeConfig
from etda.ensemble import ENSEMBLES
from etda.experiment import (
    PROJECTIONS,
    damping_summary,
    default_out_dir,
    parse_damping,
    run_attribution,
    set_threads,
)
from etda.features.curvature import CURVATURES, FISHERS
from etda.io import human_bytes
from etda.methods import method_takes

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
    rank: RankOpt = None,
    lora_epochs: LoraEpochsOpt = None,
    lora_gradients: LoraGradientsOpt = None,
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
            help="TRAK/IF damping: auto (spectral mean) | gcv | evidence | edof:F | FLOAT | "
            "trace:C (C x auto).",
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
    solve: Annotated[
        str,
        typer.Option(
            callback=_solve_cb,
            autocompletion=lambda: ["member", "shared"],
            help="TRAK: one damped solve per member (member) or one for the ensemble's mean "
            "kernel (shared: the members' features side by side).",
        ),
    ] = "member",
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
    kernel_dtype: Annotated[
        str,
        typer.Option(
            callback=_kernel_dtype_cb,
            autocompletion=lambda: list(KERNEL_DTYPES),
            help="Precision of the kernel's matrix products: float64 | float32 (about twice as "
            "fast on CPUs) | bfloat16; sums stay float64.",
        ),
    ] = "float64",
    solve_dtype: Annotated[
        str,
        typer.Option(
            callback=lambda v: _dtype_cb(v, SOLVE_DTYPES),
            autocompletion=lambda: list(SOLVE_DTYPES),
            help="Precision of the damped Cholesky factorization and solves: float64 | float32 "
            "(with --kernel-dtype float32 the fastest exact path, 2.9x float64 on 5000 examples).",
        ),
    ] = "float64",
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
    """Attribute test predictions to training examples (your model with --model/--train/--test,
    or a built-in --setting); print costs, top examples and (with --lds) the LDS."""
    if damping is not None and not method_takes(method, "damping"):
        raise typer.BadParameter(f"method {method!r} has no damping", param_hint="--damping")
    method_options = {}
    if curvature != "gram" or fisher != "sampled":
        if not method_takes(method, "curvature"):
            raise typer.BadParameter(
                f"method {method!r} has no curvature option (use -m if)", param_hint="--curvature"
            )
        method_options = {"curvature": curvature, "fisher": fisher}
    if solve != "member":
        if not method_takes(method, "solve"):
            raise typer.BadParameter(f"method {method!r} has no shared solve", param_hint="--solve")
        method_options["solve"] = solve
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
                {
                    "members": members,
                    "p": p,
                    "rank": rank,
                    "lora_epochs": lora_epochs,
                    "lora_gradients": lora_gradients,
                },
                ensemble,
                proj_dim=proj_dim,
                projection=projection,
                seed=seed,
                store=store,
                progress=progress,
                memory_budget=_bytes_option(max_memory, "--max-memory"),
                storage=storage,
                kernel_dtype=kernel_dtype,
                solve_dtype=solve_dtype,
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
            lora_gradients=lora_gradients,
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
                "kernel_dtype": kernel_dtype,
                "solve_dtype": solve_dtype,
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


def _solve_cb(value: str) -> str:
    if value not in ("member", "shared"):
        raise typer.BadParameter(f"{value!r} is not one of member, shared")
    return value


def _kernel_dtype_cb(value: str) -> str:
    return _dtype_cb(value, KERNEL_DTYPES)


def _dtype_cb(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
    return value


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
