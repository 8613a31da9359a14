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


def explain(
    setting: str | Setting,
    test: int = 0,
    *,
    prompt: str | None = None,
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
    """Explain test example ``test`` of ``setting`` (or a generated passage, ``prompt=``).

    ``prompt``/``length``/``temperature`` (sequence settings): generate ``length``
    characters after ``prompt`` with model 0 (default: enough to fill one window of
    ``T + 1`` characters), then attribute the last ``T + 1`` characters. Other options as
    in ``etda.experiment.run_attribution``. Returns an :class:`Explanation`.
    """
    from etda.experiment import parse_damping

    setting = get_setting(setting) if isinstance(setting, str) else setting
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    data = setting.data()
    sequence = setting.task == "sequence"
    if prompt is not None and not sequence:
        raise ValueError(
            f"--prompt generates text: setting {setting.name!r} is not a sequence setting "
            "(try kjv-transformer)"
        )
    options: dict[str, Any] = {}
    if parse_damping(damping) is not None:
        options["damping"] = parse_damping(damping)
    tms, models, method_obj, ens, checkpoint_kw = _models(
        setting,
        method,
        ensemble,
        k_models,
        members,
        model_dir,
        options,
        p=p,
        rank=rank,
        lora_epochs=lora_epochs,
    )
    generated = None
    if prompt is not None:
        seq_len = int(data.x_train.shape[1])
        need = seq_len + 1
        length = max(1, need - len(prompt)) if length is None else length
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if len(prompt) + length < need:
            raise ValueError(
                f"prompt ({len(prompt)} characters) + length ({length}) is shorter than one "
                f"window of {need} characters; raise --length to at least {need - len(prompt)}"
            )
        generated = generate_text(tms[0].model, data.vocab, prompt, length, temperature, seed)
        ids = data.vocab.encode(generated[-need:])
        x_test, y_test = ids[:-1][None], ids[1:][None]
        test_label = "generated"
        test_index = -1
    else:
        if not isinstance(test, int) or not 0 <= test < data.n_test:
            raise ValueError(f"test must be an index in [0, {data.n_test}), got {test!r}")
        x_test, y_test = data.x_test[test : test + 1], data.y_test[test : test + 1]
        test_index = test
        test_label = (
            _passage_label(data, "test", test) if sequence else _class(data, int(y_test[0]))
        )
    if sequence and projection == "auto" and proj_dim is None:
        projection, proj_dim = "factored", SEQUENCE_PROJ_DIM
    scores = attribute(
        models,
        train=(data.x_train, data.y_train),
        test=(x_test, y_test),
        method=method_obj,
        ensemble=ens,
        task=setting.make_task(),
        projection=projection,
        proj_dim=proj_dim,
        seed=seed,
        progress=progress,
        train_seconds=sum(t.seconds for t in tms),
        **checkpoint_kw,
    )
    f = float(setting.output(tms[0].model, x_test, y_test)[0])
    row = scores.top(top_k)[0]

    def example(i: int, s: float) -> Example:
        if sequence:
            return Example(i, s, _passage_label(data, "train", i), data.passage("train", i))
        return Example(i, s, _class(data, int(data.y_train[i])), x=data.x_train[i])

    text = data.vocab.decode(torch.cat([x_test[0], y_test[0, -1:]])) if sequence else None
    info: dict[str, Any] = {"output": "sequence log-likelihood" if sequence else "margin"}
    if sequence:
        info["nats_per_char"] = -f / int(y_test.shape[1])
    else:
        with torch.no_grad():
            info["predicted"] = _class(data, int(tms[0].model.eval()(x_test).argmax(-1)[0]))
    return Explanation(
        setting=setting.name,
        method=scores.method,
        ensemble=ensemble,
        n_models=len(models),
        n_members=len(scores.config["members"]),
        test=Example(test_index, f, test_label, text, None if sequence else x_test[0]),
        proponents=[example(i, s) for i, s in row["proponents"]],
        opponents=[example(i, s) for i, s in row["opponents"]],
        scores=scores,
        prompt=prompt,
        generated=generated,
        info=info,
    )


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
        lines.append(f"generated: {_show(e.generated)!r}")
        lines.append(f"attributed passage (last {len(e.test.text or '')} characters):")
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
