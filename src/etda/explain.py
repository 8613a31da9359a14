"""Explain one prediction: the training examples that most support and oppose it.

``explain(setting, test=N)`` attributes test example ``N`` of a named setting to its
training set with any method x ensemble and returns the top-k proponents (positive
scores: they raise the test output, i.e. the margin or the sequence log-likelihood) and
opponents. For sequence settings, ``prompt=...`` first continues the prompt with the
setting's trained model (greedy, or sampled with a seeded generator) and then attributes
the generated passage as a test sequence. ``render_text`` prints an explanation;
``render_png`` draws the test image and the top proponent/opponent images (image settings).

Everything is deterministic in ``seed`` (projections, masks, adapters, sampling) and the
cached models (``model_dir``), so the same call prints the same explanation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from etda.engine import attribute
from etda.scores import Scores
from etda.settings import Setting, get_setting
from etda.task import IGNORE_INDEX

# Defaults for sequence settings: the exact kernel ("none") would flatten every token
# layer's gradient (n x p floats), so sketch the outer products instead.
SEQUENCE_PROJ_DIM = 2048


@dataclass
class Example:
    """One explained or explaining example: its index, score and what to show."""

    index: int  # position in the training (or test) set; -1 for generated text
    score: float
    label: str  # class name, or the verse reference of a passage
    text: str | None = None  # passage (sequence settings)
    x: Tensor | None = None  # the input (image settings; drawn by render_png)


@dataclass
class Explanation:
    """The explanation of one test example (or generated passage)."""

    setting: str
    method: str
    ensemble: str
    n_models: int
    n_members: int
    test: Example  # score: the model output f (margin or sequence log-likelihood)
    proponents: list[Example]
    opponents: list[Example]
    scores: Scores  # (1, n_train)
    prompt: str | None = None
    generated: str | None = None  # prompt + continuation (sequence settings with a prompt)
    info: dict[str, Any] = field(default_factory=dict)


def _passage_label(setting_data: Any, split: str, i: int) -> str:
    offsets = getattr(setting_data, f"{split}_offsets", ())
    if not offsets:
        return ""
    from etda.data.text import load_kjv

    return load_kjv().ref_at(offsets[i])


def _models(
    setting: Setting,
    method: str,
    kind: str,
    k_models: int,
    members: int | None,
    model_dir: str | os.PathLike,
    method_options: dict[str, Any],
    **ensemble_options: Any,
) -> tuple[list, list, Any, Any, dict[str, Any]]:
    """Trained models (cached), the method and ensemble objects, and the checkpoint
    arguments of a method that reads checkpoints."""
    from etda.compat import check
    from etda.experiment import default_members, make_ensemble, prepare_models
    from etda.methods import get_method

    m = get_method(method, **method_options)
    ens = make_ensemble(kind, members, **ensemble_options)
    check(m, ens, checkpoints=[])
    n_ckpt = (members or default_members(kind)) if ens.members_are_checkpoints else 5
    tms, models, checkpoint_kw = prepare_models(
        setting, m, ens, k_models, n_ckpt, model_dir, 0, progress=False
    )
    return tms, models, m, ens, checkpoint_kw


def generate_text(
    model: torch.nn.Module,
    vocab: Any,
    prompt: str,
    length: int,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """``prompt`` continued by ``length`` characters (greedy if ``temperature == 0``)."""
    ids = vocab.encode(prompt)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty; give at least one character")
    gen = torch.Generator().manual_seed(seed)
    return vocab.decode(model.generate(ids, length, temperature=temperature, generator=gen))


@dataclass
class _Run:
    """A setting with its trained models and the method and ensemble to attribute with."""

    setting: Setting
    data: Any
    tms: list
    models: list
    method: Any
    ensemble: Any
    checkpoint_kw: dict[str, Any]

    @property
    def sequence(self) -> bool:
        return self.setting.task == "sequence"


@dataclass
class _Test:
    """The attributed test input: one sequence or example ``x``/``y`` of shape ``(1, ...)``."""

    x: Tensor
    y: Tensor  # next-token targets: the prompt's are -100 (counted nowhere)
    index: int  # test index, -1 for a prompt's completion
    label: str
    generated: str | None = None  # prompt + completion
    completion_given: bool = False


def _prepare(
    setting: str | Setting,
    method: str,
    ensemble: str,
    members: int | None,
    k_models: int,
    damping: float | str | None,
    model_dir: str | os.PathLike | None,
    **ensemble_options: Any,
) -> _Run:
    from etda.experiment import parse_damping

    setting = get_setting(setting) if isinstance(setting, str) else setting
    options: dict[str, Any] = {}
    if parse_damping(damping) is not None:
        options["damping"] = parse_damping(damping)
    tms, models, method_obj, ens, checkpoint_kw = _models(
        setting, method, ensemble, k_models, members, model_dir, options, **ensemble_options
    )
    return _Run(setting, setting.data(), tms, models, method_obj, ens, checkpoint_kw)


def _check_sequence(setting: Setting, what: str) -> None:
    if setting.task != "sequence":
        raise ValueError(
            f"{what}: setting {setting.name!r} is not a sequence setting (try kjv-transformer)"
        )


def _test_input(
    run: _Run,
    test: int,
    prompt: str | None,
    completion: str | None,
    length: int | None,
    temperature: float,
    seed: int,
) -> _Test:
    """Test example ``test``, or the completion of ``prompt`` (generated, or ``completion``)
    in its last window of ``T + 1`` characters, the prompt's targets masked."""
    data = run.data
    if prompt is not None or completion is not None:
        return _completion_input(run, prompt or "", completion, length, temperature, seed)
    if not isinstance(test, int) or not 0 <= test < data.n_test:
        raise ValueError(f"test must be an index in [0, {data.n_test}), got {test!r}")
    x, y = data.x_test[test : test + 1], data.y_test[test : test + 1]
    label = _passage_label(data, "test", test) if run.sequence else _class(data, int(y[0]))
    return _Test(x, y, test, label)


def _completion_input(
    run: _Run,
    prompt: str,
    completion: str | None,
    length: int | None,
    temperature: float,
    seed: int,
) -> _Test:
    from etda.generative import prompt_mask

    need = int(run.data.x_train.shape[1]) + 1  # tokens (characters for a character model)
    vocab = run.data.vocab
    p_len = int(vocab.encode(prompt).numel()) if prompt else 0
    if completion is None:
        length = max(1, need - p_len) if length is None else length
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if p_len + length < need:
            raise ValueError(
                f"prompt ({p_len} tokens) + length ({length}) is shorter than one window of "
                f"{need} tokens; raise --length to at least {need - p_len}"
            )
        text = generate_text(run.tms[0].model, vocab, prompt, length, temperature, seed)
    elif not completion:
        raise ValueError("the completion is empty; give at least one character")
    else:
        text = prompt + completion
    ids = vocab.encode(text)
    window = ids[-need:]  # a given completion may be shorter than a window
    if window.numel() < 2:
        raise ValueError("prompt + completion must have at least 2 tokens")
    in_window = max(0, p_len - (ids.numel() - window.numel()))  # prompt tokens kept
    y = prompt_mask(window[1:][None], in_window)
    label = "completion" if completion is not None else "generated"
    return _Test(window[:-1][None], y, -1, label, text, completion is not None)


def _sequence_ids(data: Any, x: Tensor, y: Tensor) -> Tensor:
    """The tokens of one window ``(L,)``: its inputs and its last target, right padding
    (``data.pad_id``, where the data have one) dropped."""
    pad = getattr(data, "pad_id", None)
    n = int((x != pad).sum()) if pad is not None else int(x.numel())
    last = y[n - 1 : n]
    return torch.cat([x[:n], last[last != IGNORE_INDEX]])


def _token_texts(vocab: Any, ids: Tensor) -> list[str]:
    """The text of each token (one character each for a character vocabulary)."""
    if hasattr(vocab, "tokens"):
        return vocab.tokens(ids)
    return list(vocab.decode(ids))


def _attribute_options(
    run: _Run, projection: str, proj_dim: int | None, seed: int, progress: bool
) -> dict[str, Any]:
    """Keywords of ``etda.attribute`` for this run (sequence settings: factored sketch)."""
    if run.sequence and projection == "auto" and proj_dim is None:
        projection, proj_dim = "factored", SEQUENCE_PROJ_DIM
    return dict(
        method=run.method,
        ensemble=run.ensemble,
        task=run.setting.make_task(),
        projection=projection,
        proj_dim=proj_dim,
        seed=seed,
        progress=progress,
        train_seconds=sum(t.seconds for t in run.tms),
        **run.checkpoint_kw,
    )


def explain(
    setting: str | Setting,
    test: int = 0,
    *,
    prompt: str | None = None,
    completion: str | None = None,
    length: int | None = None,
    temperature: float = 0.8,
    method: str = "trak",
    ensemble: str = "none",
    members: int | None = None,
    k_models: int = 1,
    top_k: int = 5,
    projection: str = "auto",
    proj_dim: int | None = None,
    damping: float | str | None = None,
    p: float | None = None,
    rank: int | None = None,
    lora_epochs: int | None = None,
    seed: int = 0,
    model_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Explanation:
    """Explain test example ``test`` of ``setting`` (or a prompt's completion, ``prompt=``).

    ``prompt``/``length``/``temperature`` (sequence settings): generate ``length``
    characters after ``prompt`` with model 0 (default: enough to fill one window of
    ``T + 1`` characters), or take ``completion`` as given; then attribute the completion's
    tokens in the last ``T + 1`` characters (the prompt's targets are masked, so only the
    completion counts). Other options as in ``etda.experiment.run_attribution``.
    """
    setting = get_setting(setting) if isinstance(setting, str) else setting
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if prompt is not None or completion is not None:
        _check_sequence(setting, "--prompt generates text")
    run = _prepare(
        setting,
        method,
        ensemble,
        members,
        k_models,
        damping,
        model_dir,
        p=p,
        rank=rank,
        lora_epochs=lora_epochs,
    )
    t = _test_input(run, test, prompt, completion, length, temperature, seed)
    data = run.data
    scores = attribute(
        run.models,
        train=(data.x_train, data.y_train),
        test=(t.x, t.y),
        **_attribute_options(run, projection, proj_dim, seed, progress),
    )
    f = float(setting.output(run.tms[0].model, t.x, t.y)[0])
    row = scores.top(top_k)[0]
    return Explanation(
        setting=setting.name,
        method=scores.method,
        ensemble=ensemble,
        n_models=len(run.models),
        n_members=len(scores.config["members"]),
        test=_test_example(run, t, f),
        proponents=[_train_example(run, i, s) for i, s in row["proponents"]],
        opponents=[_train_example(run, i, s) for i, s in row["opponents"]],
        scores=scores,
        prompt=prompt if t.generated is not None else None,
        generated=t.generated,
        info=_info(run, t, f),
    )


def _train_example(run: _Run, i: int, score: float) -> Example:
    data = run.data
    if run.sequence:
        return Example(i, score, _passage_label(data, "train", i), data.passage("train", i))
    return Example(i, score, _class(data, int(data.y_train[i])), x=data.x_train[i])


def _test_example(run: _Run, t: _Test, f: float) -> Example:
    if not run.sequence:
        return Example(t.index, f, t.label, None, t.x[0])
    ids = _sequence_ids(run.data, t.x[0], t.y[0])  # the last target is never a prompt token
    return Example(t.index, f, t.label, run.data.vocab.decode(ids))


def _info(run: _Run, t: _Test, f: float) -> dict[str, Any]:
    if not run.sequence:
        with torch.no_grad():
            pred = int(run.tms[0].model.eval()(t.x).argmax(-1)[0])
        return {"output": "margin", "predicted": _class(run.data, pred)}
    counted = int((t.y != IGNORE_INDEX).sum())
    info = {"output": "sequence log-likelihood", "nats_per_char": -f / counted}
    info.update(counted=counted, completion_given=t.completion_given)
    return info


def _class(data: Any, y: int) -> str:
    names = data.class_names
    return f"{y} {names[y]}" if names and names[y] != str(y) else str(y)


def _show(text: str) -> str:
    return text.replace("\n", " ⏎ ")


def render_text(e: Explanation, costs: bool = True) -> str:
    """The explanation as plain text (one line per example); ``costs``: add the costs line
    (timings vary between runs; everything else is a function of the seed)."""
    lines = [
        f"{e.setting} · {e.method} · ensemble {e.ensemble} "
        f"({e.n_models} model(s), {e.n_members} member(s))"
    ]
    if e.generated is not None:
        lines.append(f"prompt: {_show(e.prompt or '')!r}")
        given = "completion" if e.info.get("completion_given") else "generated"
        lines.append(f"{given}: {_show(e.generated)!r}")
        lines.append(
            f"attributed passage (last {len(e.test.text or '')} characters; only the "
            f"completion's {e.info.get('counted', '?')} characters count):"
        )
    else:
        lines.append(f"test #{e.test.index} ({e.test.label}):")
    if "output_line" in e.info:  # saved scores: no model run here
        if e.test.text is not None:
            lines.append(f"  {_show(e.test.text)!r}")
        lines.append(f"  {e.info['output_line']}")
    elif e.test.text is not None:
        lines.append(f"  {_show(e.test.text)!r}")
        lines.append(
            f"  log-likelihood {e.test.score:.2f} nats ({e.info['nats_per_char']:.3f} nats/char)"
        )
    else:
        lines.append(f"  margin {e.test.score:+.3f}, predicted {e.info.get('predicted', '?')}")
    for title, group in (("proponents (+)", e.proponents), ("opponents (-)", e.opponents)):
        lines.append(f"top {len(group)} {title}:")
        for rank, ex in enumerate(group, 1):
            what = f"  {_show(ex.text)!r}" if ex.text is not None else ""
            lines.append(f"  {rank}. {ex.score:+.4g}  train #{ex.index} ({ex.label}){what}")
    if costs:
        lines.append(f"costs: {e.scores.costs.summary()}")
    return "\n".join(lines)


def explain_saved(
    scores: Scores,
    train: Any,
    test: Any = None,
    index: int = 0,
    top_k: int = 5,
    decode: Any = None,
) -> Explanation:
    """The explanation of test example ``index`` from saved ``scores`` of the user's data:
    ``train``/``test`` as ``etda.attribute`` takes them (the inputs shown), ``decode(x) ->
    str`` to show text inputs; image-like inputs are drawn by :func:`render_png`."""
    from etda.batch import is_dict
    from etda.sources import as_tensors

    n_test, n_train = scores.shape
    if not isinstance(index, int) or not 0 <= index < n_test:
        raise ValueError(f"test index must be in [0, {n_test}), got {index!r}")
    x, y = as_tensors(train, "train")
    if y.shape[0] != n_train:
        raise ValueError(f"the scores have {n_train} training columns, the data {y.shape[0]}")

    def shown(xs: Any, ys: Tensor, i: int, score: float) -> Example:
        xi = {k: v[i] for k, v in xs.items()} if is_dict(xs) else xs[i]
        text = decode(xi) if decode is not None else None
        image = None if text is not None or is_dict(xs) else xi
        label = str(ys[i].tolist()) if ys[i].numel() <= 4 else f"{tuple(ys[i].shape)} targets"
        return Example(i, score, label, text, image)

    row = scores.top(top_k)[index]
    if test is not None:
        xt, yt = as_tensors(test, "test")
        head = shown(xt, yt, index, float("nan"))
    else:
        head = Example(index, float("nan"), "?")
    cfg = scores.config
    return Explanation(
        setting="your data",
        method=scores.method,
        ensemble=str(cfg.get("ensemble", {}).get("preset", "?")),
        n_models=int(cfg.get("n_models", 1)),
        n_members=len(cfg.get("members", [])),
        test=head,
        proponents=[shown(x, y, int(i), float(v)) for i, v in row["proponents"]],
        opponents=[shown(x, y, int(i), float(v)) for i, v in row["opponents"]],
        scores=scores,
        info={"output_line": f"saved scores ({n_test} x {n_train})", "predicted": "-"},
    )


def _image(x: Tensor) -> np.ndarray:
    """An example ``(C, H, W)``, ``(H, W)`` or flat square vector as an image array."""
    a = x.detach().cpu().double().numpy()
    if a.ndim == 1:
        side = int(math.isqrt(a.size))
        if side * side != a.size:
            raise ValueError(f"cannot draw a flat input of {a.size} values as an image")
        return a.reshape(side, side)
    if a.ndim == 3:
        return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1).clip(0, 1)
    return a


def render_png(e: Explanation, path: str | os.PathLike) -> Path:
    """Draw the test image and its proponents/opponents into a PNG grid; returns the path."""
    from etda.io import require

    Figure = require("matplotlib.figure", "the image grid of etda explain").Figure  # noqa: N806
    # (no pyplot: Agg output, no global backend state)

    if e.test.x is None:
        raise ValueError("render_png draws image settings; print text explanations instead")
    k = max(len(e.proponents), len(e.opponents))
    fig = Figure(figsize=(1.6 * k, 5.4))
    axes = fig.subplots(3, k, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(_image(e.test.x), cmap="gray")
    axes[0, 0].set_title(f"test #{e.test.index}\n{e.test.label}", fontsize=7)
    axes[0, 1 if k > 1 else 0].text(
        0.0,
        0.5,
        f"{e.method} · {e.ensemble}\nmargin {e.test.score:+.2f}\npred {e.info.get('predicted')}",
        fontsize=7,
        va="center",
    )
    for r, (name, group) in enumerate((("+", e.proponents), ("−", e.opponents)), start=1):
        for j, ex in enumerate(group):
            axes[r, j].imshow(_image(ex.x), cmap="gray")
            axes[r, j].set_title(f"{name} #{ex.index} {ex.label}\n{ex.score:+.3g}", fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------ token-wise scores


@dataclass
class TokenExplanation:
    """Token-wise scores of one test sequence: which training windows support each token."""

    setting: str
    method: str
    ensemble: str
    n_members: int
    test: Example  # the attributed passage (index, label, text)
    context: str  # the first character(s): input only, never predicted
    tokens: list[str]  # (T,) the predicted tokens, in order
    values: np.ndarray  # (T, n_train) float64; NaN rows: not attributed (prompt, padding)
    top: list[list[Example]]  # per token, its strongest proponents ([] where NaN)
    scores: Scores  # of the token copies, (T, n_train)
    prompt: str | None = None
    generated: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def top_scores(self) -> np.ndarray:
        """The strongest proponent's score of every token ``(T,)``, NaN where not attributed."""
        out = np.full(len(self.tokens), np.nan)
        for t, top in enumerate(self.top):
            if top:
                out[t] = top[0].score
        return out


def _top_per_token(values: np.ndarray, k: int, example: Any) -> list[list[Example]]:
    """The ``k`` highest-scoring training examples of every row of ``values (T, n)``."""
    out: list[list[Example]] = []
    for row in values:
        if np.isnan(row).all():
            out.append([])
            continue
        order = np.argsort(-row, kind="stable")[:k]
        out.append([example(int(i), float(row[i])) for i in order])
    return out


def explain_tokens(
    setting: str | Setting,
    test: int = 0,
    *,
    per_token: int = 3,
    prompt: str | None = None,
    completion: str | None = None,
    length: int | None = None,
    temperature: float = 0.8,
    method: str = "trak",
    ensemble: str = "none",
    members: int | None = None,
    k_models: int = 1,
    projection: str = "auto",
    proj_dim: int | None = None,
    damping: float | str | None = None,
    p: float | None = None,
    rank: int | None = None,
    lora_epochs: int | None = None,
    seed: int = 0,
    model_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> TokenExplanation:
    """Token-wise scores of test example ``test`` (or of a prompt's completion, as in
    :func:`explain`) by ``etda.generative.token_attribution``: one run for all tokens; for
    every token its ``per_token`` strongest proponents. Sequence settings only."""
    from etda.generative import token_attribution, token_values

    setting = get_setting(setting) if isinstance(setting, str) else setting
    _check_sequence(setting, "--tokens scores the tokens of a text")
    if not isinstance(per_token, int) or per_token <= 0:
        raise ValueError(f"per_token must be a positive integer, got {per_token!r}")
    run = _prepare(
        setting,
        method,
        ensemble,
        members,
        k_models,
        damping,
        model_dir,
        p=p,
        rank=rank,
        lora_epochs=lora_epochs,
    )
    t = _test_input(run, test, prompt, completion, length, temperature, seed)
    data = run.data
    scores, counted = token_attribution(
        run.models,
        (data.x_train, data.y_train),
        (t.x, t.y),
        **_attribute_options(run, projection, proj_dim, seed, progress),
    )
    ids = _sequence_ids(data, t.x[0], t.y[0])
    text = data.vocab.decode(ids)
    pieces = _token_texts(data.vocab, ids)
    values = token_values(scores.values, counted)[0][: len(pieces) - 1]  # padding dropped
    info = _info(run, t, float(setting.output(run.tms[0].model, t.x, t.y)[0]))
    info["logp"] = _token_logp(run.tms[0].model, t.x, t.y)
    return TokenExplanation(
        setting=setting.name,
        method=scores.method,
        ensemble=ensemble,
        n_members=len(scores.config["members"]),
        test=Example(t.index, float("nan"), t.label, text),
        context=pieces[0],
        tokens=pieces[1:],
        values=values,
        top=_top_per_token(values, per_token, lambda i, s: _train_example(run, i, s)),
        scores=scores,
        prompt=prompt if t.generated is not None else None,
        generated=t.generated,
        info=info,
    )


@torch.no_grad()
def _token_logp(model: torch.nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """log p of every target token of one sequence under ``model`` (NaN where masked)."""
    was = model.training
    model.eval()
    try:
        logp = torch.log_softmax(model(x).double(), -1)[0]
    finally:
        model.train(was)
    tok = logp.gather(-1, y[0].clamp_min(0)[:, None])[:, 0]
    return torch.where(y[0] == IGNORE_INDEX, float("nan"), tok).tolist()


def explain_saved_tokens(
    scores: Scores,
    train: Any,
    test: Any,
    index: int = 0,
    per_token: int = 3,
    decode: Any = None,
) -> TokenExplanation:
    """Token-wise explanation of test sequence ``index`` from saved token-wise scores of the
    user's data (``etda.generative.token_attribution(...)[0].save(DIR)``: ``n_test * T``
    rows); ``test``'s targets ``(n_test, T)`` give the tokens, ``decode(ids) -> str`` shows
    them (and the training inputs)."""
    from etda.generative import token_values
    from etda.sources import as_tensors

    xt, yt = as_tensors(test, "test")
    if yt.ndim != 2 or yt.is_floating_point():
        raise ValueError(
            f"--tokens needs next-token targets (n_test, T) in the test data, got "
            f"{tuple(yt.shape)} {yt.dtype}"
        )
    n_test, t_len = yt.shape
    if scores.shape[0] != n_test * t_len:
        raise ValueError(
            f"the scores have {scores.shape[0]} rows; token-wise scores of {n_test} test "
            f"sequences of {t_len} tokens have {n_test * t_len} (save the Scores of "
            "etda.generative.token_attribution)"
        )
    if not isinstance(index, int) or not 0 <= index < n_test:
        raise ValueError(f"test index must be in [0, {n_test}), got {index!r}")
    if not isinstance(per_token, int) or per_token <= 0:
        raise ValueError(f"per_token must be a positive integer, got {per_token!r}")
    rows = np.asarray(scores.values[index * t_len : (index + 1) * t_len])
    values = token_values(rows, (yt[index] != IGNORE_INDEX)[None])[0]
    x, y = as_tensors(train, "train")
    if y.shape[0] != scores.shape[1]:
        raise ValueError(
            f"the scores have {scores.shape[1]} training columns, the data {y.shape[0]}"
        )
    show = decode if decode is not None else (lambda ids: " ".join(map(str, ids.tolist())))
    context = show(xt[index, :1]) if isinstance(xt, Tensor) else ""
    tokens = [show(yt[index, t : t + 1].clamp_min(0)) for t in range(t_len)]
    cfg = scores.config
    return TokenExplanation(
        setting="your data",
        method=scores.method,
        ensemble=str(cfg.get("ensemble", {}).get("preset", "?")),
        n_members=len(cfg.get("members", [])),
        test=Example(index, float("nan"), f"test #{index}", context + "".join(tokens)),
        context=context,
        tokens=tokens,
        values=values,
        top=_top_per_token(values, per_token, lambda i, s: _user_example(x, y, i, s, decode)),
        scores=scores,
        info={"output_line": f"saved token-wise scores ({scores.shape[0]} x {scores.shape[1]})"},
    )


def _user_example(x: Any, y: Tensor, i: int, score: float, decode: Any) -> Example:
    from etda.batch import is_dict

    xi = {k: v[i] for k, v in x.items()} if is_dict(x) else x[i]
    text = decode(xi) if decode is not None else None
    label = str(y[i].tolist()) if y[i].numel() <= 4 else f"{tuple(y[i].shape)} targets"
    return Example(i, score, label, text)


# Colours of a score: white -> green (helps) or red (hurts), by |score| / scale.
_GREEN, _RED = (46, 160, 67), (215, 58, 73)


def score_rgb(score: float, scale: float) -> tuple[int, int, int] | None:
    """The background colour of a token of top score ``score`` (None: not attributed)."""
    if not np.isfinite(score) or scale <= 0:
        return None
    a = min(1.0, abs(score) / scale)
    end = _GREEN if score >= 0 else _RED
    return tuple(round(255 + a * (c - 255)) for c in end)  # type: ignore[return-value]


def _scale(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _proponent_line(ex: Example, width: int = 48) -> str:
    text = f" {_show(ex.text)[:width]!r}" if ex.text is not None else ""
    where = f" ({ex.label})" if ex.label else ""
    return f"{ex.score:+.3g} #{ex.index}{where}{text}"


def print_tokens(te: TokenExplanation, console: Any = None) -> None:
    """Print a token explanation with rich: the passage with every token coloured by its
    top score, then one row per attributed token with its top proponent(s)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(highlight=False)
    console.print(
        f"{te.setting} · {te.method} · ensemble {te.ensemble} ({te.n_members} member(s)) · "
        "token-wise scores"
    )
    if te.generated is not None:
        console.print(f"prompt: {_show(te.prompt or '')!r}  text: {_show(te.generated)!r}")
    label = f"test #{te.test.index} ({te.test.label})" if te.test.index >= 0 else te.test.label
    console.print(f"{label}, coloured by each token's top score (green helps, red hurts):")
    tops, scale = te.top_scores, _scale(te.top_scores)
    line = Text(_show(te.context), style="dim")
    for tok, s in zip(te.tokens, tops, strict=True):
        rgb = score_rgb(s, scale)
        style = "dim" if rgb is None else f"black on rgb({rgb[0]},{rgb[1]},{rgb[2]})"
        line.append(_show(tok), style=style)
    console.print(line)
    table = Table("pos", "token", "log p", "top proponent(s): score #train (ref) passage")
    logp = te.info.get("logp") or [float("nan")] * len(te.tokens)
    for t, (tok, top) in enumerate(zip(te.tokens, te.top, strict=True)):
        if top:
            lines = "\n".join(_proponent_line(ex) for ex in top)
            lp = f"{logp[t]:.2f}" if np.isfinite(logp[t]) else "–"
            table.add_row(str(t + 1), repr(tok), lp, lines)
    console.print(table)
    if "output_line" not in te.info:
        console.print(f"costs: {te.scores.costs.summary()}")


def render_tokens(te: TokenExplanation, width: int = 140) -> str:
    """:func:`print_tokens` as plain text (no colours)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    print_tokens(te, Console(file=buf, width=width, color_system=None, highlight=False))
    return buf.getvalue()


def render_html(te: TokenExplanation, path: str | os.PathLike) -> Path:
    """A self-contained HTML heat map: tokens coloured by their top score; hovering a token
    shows its top proponents' scores, references and text. Returns the path."""
    import html

    tops, scale = te.top_scores, _scale(te.top_scores)
    spans = [f'<span class="ctx">{_html_char(te.context)}</span>']
    for tok, s, top in zip(te.tokens, tops, te.top, strict=True):
        rgb = score_rgb(s, scale)
        if rgb is None:
            spans.append(f'<span class="ctx" title="not attributed">{_html_char(tok)}</span>')
            continue
        title = html.escape("\n".join(_proponent_line(ex, 200) for ex in top), quote=True)
        style = f"background:rgb({rgb[0]},{rgb[1]},{rgb[2]})"
        spans.append(f'<span style="{style}" title="{title}">{_html_char(tok)}</span>')
    head = html.escape(
        f"{te.setting} · {te.method} · ensemble {te.ensemble} ({te.n_members} member(s)) · "
        f"{te.test.label}"
    )
    body = (
        f"<h1>{head}</h1><p>Each token is coloured by the score of its strongest proponent "
        f"(green helps, red hurts; full colour = {scale:.3g}); hover for its top proponents."
        f'</p><div class="text">{"".join(spans)}</div>'
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>etda token scores</title>'
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".text{font-family:monospace;font-size:1.3em;line-height:1.8;white-space:pre-wrap}"
        ".ctx{color:#888}h1{font-size:1.1em}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _html_char(text: str) -> str:
    import html

    return html.escape(text).replace("\n", "⏎<br>")


def render_tokens_png(te: TokenExplanation, path: str | os.PathLike, per_row: int = 32) -> Path:
    """The token heat map as a PNG (matplotlib): one cell per character, coloured by the
    token's top score. Returns the path."""
    from etda.io import require

    Figure = require("matplotlib.figure", "the token heat map of etda explain").Figure  # noqa: N806
    chars = [te.context, *te.tokens]
    per_row = max(1, min(per_row, len(chars)))
    tops = np.concatenate([[np.nan], te.top_scores])
    rows, scale = -(-len(chars) // per_row), _scale(te.top_scores)
    fig = Figure(figsize=(0.32 * per_row, 0.45 * rows + 0.8))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.8))
    ax.set_xlim(0, per_row)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for j, (ch, s) in enumerate(zip(chars, tops, strict=True)):
        r, c = divmod(j, per_row)
        rgb = score_rgb(s, scale)
        face = "#f0f0f0" if rgb is None else tuple(v / 255 for v in rgb)
        ax.add_patch(_rectangle((c, r), face))
        shown = "⏎" if ch == "\n" else ch
        ax.text(c + 0.5, r + 0.55, shown, ha="center", va="center", family="monospace")
    fig.suptitle(
        f"{te.setting} · {te.method} · {te.test.label}: tokens by top score "
        f"(green helps, red hurts; full = {scale:.3g})",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _rectangle(xy: tuple[int, int], face: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, 1, 1, facecolor=face, edgecolor="white")


# ------------------------------------------------------------------- data owners


def setting_owners(setting: str | Setting, level: str = "book") -> list[str]:
    """The owner of every training window of a built-in text setting: its book (or chapter,
    verse) by ``etda.data.text.window_owners``; ``(n_train,)``."""
    from etda.data.text import window_owners

    setting = get_setting(setting) if isinstance(setting, str) else setting
    data = setting.data()
    if not getattr(data, "train_offsets", ()):
        raise ValueError(
            f"--by {level}: setting {setting.name!r} has no verse references; owners are "
            "the books of a text setting's windows (try kjv-transformer)"
        )
    return window_owners(data, "train", level)


@dataclass
class OwnerScore:
    """One data owner's total score for a test example."""

    owner: str
    score: float  # sum of its training examples' scores
    n: int  # its training examples


def top_owners(
    values: np.ndarray, owners: list[str], k: int = 5
) -> tuple[list[OwnerScore], list[OwnerScore]]:
    """The ``k`` owners of highest and of lowest summed score, for one test example's
    scores ``(n_train,)`` (``etda.generative.by_owner``)."""
    from collections import Counter

    from etda.generative import by_owner

    sums, names = by_owner(np.asarray(values, dtype=np.float64)[None], owners)
    counts = Counter(owners)
    rows = [OwnerScore(str(o), float(s), counts[o]) for o, s in zip(names, sums[0], strict=True)]
    ranked = sorted(rows, key=lambda r: -r.score)
    return ranked[:k], ranked[::-1][:k]


def render_owners(
    top: list[OwnerScore], bottom: list[OwnerScore], level: str = "book", total: int = 0
) -> str:
    """Top and bottom owners as plain text, one line each."""
    of = f" of {total}" if total else ""
    lines = []
    for title, group in (("highest", top), ("lowest", bottom)):
        lines.append(f"{len(group)}{of} {level}s of {title} score (sum over their windows):")
        for rank, r in enumerate(group, 1):
            lines.append(
                f"  {rank}. {r.score:+.4g}  {r.owner} ({r.n} window(s), mean {r.score / r.n:+.3g})"
            )
    return "\n".join(lines)
