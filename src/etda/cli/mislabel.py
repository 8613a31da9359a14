"""`etda mislabel`: rank training examples by a mislabel detector."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from etda.cli._app import (
    MethodOpt,
    ModelDirOpt,
    SettingOpt,
    ThreadsOpt,
    _choice,
    _out,
    _user_errors,
    app,
)
from etda.detect import DETECTORS
from etda.experiment import set_threads


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
