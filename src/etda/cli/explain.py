"""`etda explain`: the training examples behind one prediction or saved scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from etda.cli._app import (
    EnsembleOpt,
    LoraEpochsOpt,
    MethodOpt,
    ModelDirOpt,
    ModelsOpt,
    ProgressOpt,
    RankOpt,
    SettingOpt,
    ThreadsOpt,
    _choice,
    _damping_cb,
    _positive_cb,
    _projection_cb,
    _user_errors,
    app,
)
from etda.experiment import PROJECTIONS, default_members, set_threads
from etda.methods import method_takes
from etda.paths import cache_path

OWNER_LEVELS = ("book", "chapter", "verse")  # etda.data.text.OWNER_LEVELS (imported lazily)

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
        typer.Option(
            help="Sequence settings: continue this prompt and explain the completion (the "
            "prompt's own tokens are not attributed)."
        ),
    ] = None,
    completion: Annotated[
        str | None,
        typer.Option(help="With --prompt: the completion to explain (default: generated)."),
    ] = None,
    tokens: Annotated[
        bool,
        typer.Option(
            "--tokens",
            help="Sequence settings (or saved token-wise scores): each token's strongest "
            "proponent training windows, the text coloured by score.",
        ),
    ] = False,
    per_token: Annotated[
        int, typer.Option(min=1, help="With --tokens: proponents listed per token.")
    ] = 1,
    html: Annotated[
        Path | None,
        typer.Option(help="With --tokens: write a self-contained HTML heat map here."),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            callback=lambda v: _choice(v, OWNER_LEVELS, "owner level"),
            autocompletion=lambda: list(OWNER_LEVELS),
            help="Text settings: also sum the scores per data owner of the training windows "
            "(book | chapter | verse) and show the top owners.",
        ),
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
        typer.Option(
            callback=_damping_cb,
            help="TRAK/IF damping: auto | gcv | evidence | edof:F | FLOAT | trace:C.",
        ),
    ] = None,
    p: Annotated[float | None, typer.Option("--p", help="Dropout-ensemble rate override.")] = None,
    rank: RankOpt = None,
    lora_epochs: LoraEpochsOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of projections, masks, adapters, sampling.")] = 0,
    png: Annotated[
        Path | None,
        typer.Option(
            help="Image settings: where the PNG grid goes (default runs/explain/...); with "
            "--tokens: the token heat map as a PNG."
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = False,
) -> None:
    """Show the training examples that most support (+) and oppose (-) one test prediction,
    or the completion of --prompt (sequence settings); --tokens: per token; --by book: per
    data owner; image settings also get a PNG grid."""
    from etda.explain import explain as run_explain
    from etda.explain import (
        explain_tokens,
        render_owners,
        render_png,
        render_text,
        setting_owners,
        top_owners,
    )

    if html is not None and not tokens:
        raise typer.BadParameter("--html writes the token heat map: add --tokens")
    if saved is not None:
        with _user_errors():
            if by is not None:
                raise ValueError(
                    "--by groups a built-in text setting's windows by book; for saved scores of "
                    "your data sum them per owner with etda.generative.by_owner"
                )
            if tokens:
                te = _saved_tokens(saved, train_ref, test_ref, decode_ref, test, per_token)
                _token_output(te, html, png)
            else:
                _explain_saved(saved, train_ref, test_ref, decode_ref, test, top_k, png)
        return
    if damping is not None and not method_takes(method, "damping"):
        raise typer.BadParameter(f"method {method!r} has no damping", param_hint="--damping")
    set_threads(threads)
    common = dict(
        prompt=prompt,
        completion=completion,
        length=length,
        temperature=temperature,
        method=method,
        ensemble=ensemble,
        members=members,
        k_models=models,
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
    if tokens:
        with _user_errors():
            if by is not None:
                raise ValueError("--by sums whole-sequence scores; drop --tokens or --by")
            _token_output(explain_tokens(setting, test, per_token=per_token, **common), html, png)
        return
    with _user_errors():
        owners = None if by is None else setting_owners(setting, by)  # fails before training
        e = run_explain(setting, test, top_k=top_k, **common)
        typer.echo(render_text(e))
        if owners is not None:
            top, bottom = top_owners(e.scores.values[0], owners, top_k)
            typer.echo(render_owners(top, bottom, by, total=len(set(owners))))
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


def _saved_tokens(saved, train_ref, test_ref, decode_ref, index, per_token):
    from etda.explain import explain_saved_tokens
    from etda.scores import Scores
    from etda.usercode import build, load_object

    if train_ref is None or test_ref is None:
        raise ValueError(
            "--scores with --tokens needs --train and --test-data (the test targets give "
            "the tokens)"
        )
    return explain_saved_tokens(
        Scores.load(saved),
        build(train_ref),
        build(test_ref),
        index,
        per_token,
        None if decode_ref is None else load_object(decode_ref),
    )


def _token_output(te, html: Path | None, png: Path | None) -> None:
    """Print a token explanation; write its HTML and PNG heat maps when asked."""
    from etda.explain import print_tokens, render_html, render_tokens_png

    print_tokens(te)
    if html is not None:
        typer.echo(f"HTML heat map: {render_html(te, html)}")
    if png is not None:
        typer.echo(f"PNG heat map: {render_tokens_png(te, png)}")
