"""Seeded, deterministic training of small classifiers and sequence models, checkpoints, and
safetensors weights."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from etda import batch
from etda.io import atomic_write
from etda.task import Task

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "linear", "cosine")
# Fields added after the first settings were fixed: left out of ``to_dict`` at their defaults so
# the fingerprints (cache keys) of recipes that do not use them stay what they were.
_LATER_FIELDS = {"warmup": 0.0, "grad_clip": None}


@dataclass(frozen=True)
class TrainRecipe:
    """How to train a classifier: optimizer, learning-rate schedule, epochs, batch size."""

    optimizer: str = field(
        default="sgd",
        metadata={
            "help": "Optimizer: 'sgd' (with momentum), 'adam' (L2 weight decay in the gradient) "
            "or 'adamw' (decoupled weight decay)."
        },
    )
    lr: float = field(default=0.1, metadata={"help": "Peak learning rate (the rate at step 0)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum; ignored by Adam."})
    weight_decay: float = field(
        default=5e-4, metadata={"help": "L2 weight decay, applied to all parameters."}
    )
    epochs: int = field(default=20, metadata={"help": "Number of passes over the training data."})
    batch_size: int = field(
        default=100,
        metadata={"help": "Examples per step; the last, smaller batch of an epoch is kept."},
    )
    lr_schedule: str = field(
        default="linear",
        metadata={
            "help": "'constant'; 'linear': decay per step from lr to 0; 'cosine': half a cosine "
            "from lr to 0 (both over the steps after the warm-up)."
        },
    )
    warmup: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of all steps spent raising the rate linearly from lr/w to lr "
            "(w warm-up steps) before the schedule starts; 0 = none."
        },
    )
    grad_clip: float | None = field(
        default=None,
        metadata={"help": "Clip the global gradient norm of each step to this value; None = off."},
    )

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainRecipe.optimizer={self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"TrainRecipe.lr_schedule={self.lr_schedule!r}; use one of {LR_SCHEDULES}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainRecipe.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainRecipe.lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"TrainRecipe.warmup must be in [0, 1), got {self.warmup}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(
                f"TrainRecipe.grad_clip must be positive or None, got {self.grad_clip}"
            )
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(
                f"TrainRecipe.momentum ({self.momentum}) and weight_decay ({self.weight_decay}) "
                "must be >= 0"
            )

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-serializable); ``warmup`` and ``grad_clip`` only when
        set, so older recipes keep their fingerprints."""
        fields = asdict(self)
        return {k: v for k, v in fields.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate used by optimizer step ``step`` (0-based) of ``total_steps``."""
        warm = int(round(self.warmup * total_steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - warm) / (total_steps - warm)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (1.0 - progress)

    def lr_at_epoch(self, epoch: float) -> float:
        """The rate at the start of ``epoch`` (0-based, fractions allowed) of ``epochs``."""
        per_epoch = 1000
        return self.lr_at(int(round(epoch * per_epoch)), self.epochs * per_epoch)


@dataclass
class TrainResult:
    """A trained model and what it took to train it."""

    model: nn.Module  # trained, left in eval() mode
    seconds: float  # wall time of the training loop
    checkpoints: list[dict[str, Tensor]]  # cloned state_dicts at the requested epochs
    checkpoint_lrs: list[float]  # learning rate for each checkpoint (TracIn weights)
    seed: int
    recipe: TrainRecipe
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch


TASKS = ("classification", "sequence")


def infer_task(y: Tensor) -> str:
    """``"sequence"`` for 2-D targets ``(N, T)`` (next-token ids), else ``"classification"``."""
    return "sequence" if isinstance(y, Tensor) and y.ndim == 2 else "classification"


def _task_name(task: str | Task | None, y: Tensor) -> str:
    """The task's name: a name in ``TASKS``, a task object (``.name``) or None (inferred)."""
    if task is None:
        return infer_task(y)
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS} or an etda.task object")
    return name


def _loss_function(
    model: nn.Module, x: batch.Inputs, y: Tensor, task: str | Task | None, device: torch.device
) -> tuple[batch.Inputs, Tensor, Callable[[Tensor], Tensor]]:
    """The inputs and targets on the model's device, and the mean loss of a batch of indices."""
    if _builtin(task) and isinstance(x, Tensor):
        task_name = _task_name(task, y)
        _validate_xy(model, x, y, task_name)
        x, y = x.to(device), y.to(device=device, dtype=torch.long)

        def builtin_loss(idx: Tensor) -> Tensor:
            return _loss(task_name, model(x[idx]), y[idx])

        return x, y, builtin_loss
    task = _task_object(task, y)  # any task and input type: its forward and per-example loss
    x, y = batch.cast(x, next(model.parameters()).dtype, device), y.to(device)
    _validate_task(model, task, x, y)

    def task_loss(idx: Tensor) -> Tensor:
        return task.loss(batch.run_model(model, batch.select(x, idx), task), y[idx]).mean()

    return x, y, task_loss


def _builtin(task: str | Task | None) -> bool:
    """Whether ``task`` is trained by the built-in classification/sequence loops (names,
    None, or etda's own task objects: their numerics stay those of the named settings)."""
    if task is None or isinstance(task, str):
        return True
    from etda.task import ClassificationTask, SequenceTask

    return type(task) in (ClassificationTask, SequenceTask)


def _task_object(task: str | Task | None, y: Tensor) -> Task:
    from etda.task import ClassificationTask, SequenceTask, default_task

    if task is None:
        return default_task(y)
    if isinstance(task, str):
        return {"classification": ClassificationTask, "sequence": SequenceTask}[
            _task_name(task, y)
        ]()
    return task


def _validate_task(model: nn.Module, task: Task, x: batch.Inputs, y: Tensor) -> None:
    if not callable(getattr(task, "loss", None)):
        raise TypeError(f"cannot train with task {type(task).__name__}: it has no loss(out, y)")
    if batch.n_rows(x) == 0 or y.shape[0] != batch.n_rows(x):
        raise ValueError(f"x has {batch.n_rows(x)} examples but y has {y.shape[0]}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        task.check(batch.run_model(model, batch.take(x, 0, 2), task), y[:2])
    model.train(was_training)


def _validate_xy(model: nn.Module, x: Tensor, y: Tensor, task: str = "classification") -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); pass at least one example")
    if task == "sequence":
        _validate_sequence(model, x, y)
        return
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but x has {x.shape[0]} examples; "
            f"y must be a 1-D label tensor of shape ({x.shape[0]},)"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    was_training = model.training
    model.eval()  # eval: a probe forward must not update BatchNorm statistics
    with torch.no_grad():
        num_classes = model(x[:1].to(_device(model))).shape[-1]
    model.train(was_training)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"y has labels in [{lo}, {hi}] but the model outputs {num_classes} classes; "
            f"labels must lie in [0, {num_classes - 1}]"
        )


def _validate_sequence(model: nn.Module, x: Tensor, y: Tensor) -> None:
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but x has {x.shape[0]} examples; the sequence task "
            f"needs next-token targets of shape ({x.shape[0]}, T)"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer token ids, got {y.dtype}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x[:1].to(_device(model)))
    model.train(was_training)
    if out.ndim != 3 or out.shape[:2] != (1, y.shape[1]):
        raise ValueError(
            f"the sequence task needs logits (B, T, V) with T = {y.shape[1]} (the targets' "
            f"length), but the model returns {tuple(out.shape)} for one example"
        )
    counted = y[y != -100]  # etda.task.IGNORE_INDEX: padding, counted nowhere
    if counted.numel() == 0:
        raise ValueError("every target is -100 (padding): there is nothing to train on")
    lo, hi, vocab = int(counted.min()), int(counted.max()), out.shape[-1]
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"y has token ids in [{lo}, {hi}] but the model's vocabulary has {vocab} entries; "
            f"labels must lie in [0, {vocab - 1}]"
        )


def _loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of a batch: over examples, or over all tokens (sequences of
    equal length: the mean over sequences of etda.task.SequenceTask's per-example loss)."""
    if task == "sequence":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(perm: Tensor, batch_size: int) -> list[Tensor]:
    batches = list(perm.split(batch_size))
    # A trailing batch of one breaks BatchNorm in train mode: fold it into the previous one.
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _checkpoint_epochs(epochs: Sequence[int], total: int) -> list[int]:
    ckpt = sorted(set(int(e) for e in epochs))
    if ckpt and (ckpt[0] < 0 or ckpt[-1] > total):
        raise ValueError(
            f"checkpoint_epochs={list(epochs)} must lie in [0, {total}] "
            "(0 = initial weights, e = after epoch e)"
        )
    return ckpt


def _optimizer(params: list[nn.Parameter], recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, clip: float | None) -> Tensor:
    """One optimizer step on ``loss`` (the gradient norm clipped to ``clip`` when set)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss


def train_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    recipe: TrainRecipe,
    seed: int,
    checkpoint_epochs: Sequence[int] = (),
    progress: bool = False,
    task: str | Task | None = None,
) -> TrainResult:
    """Train ``model`` in place on inputs x (N, ...) (a tensor or a dict of tensors) and
    targets y.

    ``task``: ``"classification"`` (logits (B, C), labels (N,)), ``"sequence"`` (logits
    (B, T, V), next-token targets (N, T); loss = mean token cross-entropy), None (inferred
    from y: 2-D targets mean a sequence task), or any etda task object (its forward and the
    mean of its per-example loss; etda's own classification/sequence tasks keep the loops
    above).

    Deterministic in ``seed``: data order comes from a generator seeded with ``seed`` and all
    global-RNG draws (dropout) happen inside ``fork_rng`` seeded with ``seed``, so the caller's
    RNG state is untouched. ``checkpoint_epochs`` lists epochs e in [0, epochs] after which a
    cloned state_dict is kept (0 = the initial weights); its lr is the mean lr of the steps of
    epoch e (of the first step for e = 0), the usual TracIn weight for that interval.
    """
    ckpt = _checkpoint_epochs(checkpoint_epochs, recipe.epochs)
    device = _device(model)
    x, y, batch_loss = _loss_function(model, x, y, task, device)
    n = batch.n_rows(x)
    steps_per_epoch = len(_batches(torch.arange(n), recipe.batch_size))
    total_steps = steps_per_epoch * recipe.epochs
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], recipe)
    gen = torch.Generator().manual_seed(seed)
    checkpoints: list[dict[str, Tensor]] = []
    checkpoint_lrs: list[float] = []
    losses: list[float] = []

    def snapshot(lr: float) -> None:
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        checkpoint_lrs.append(lr)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        if 0 in ckpt:
            snapshot(recipe.lr_at(0, total_steps))
        step = 0
        for epoch in range(1, recipe.epochs + 1):
            loss_sum = torch.zeros((), device=device)
            lrs = []
            for idx in _batches(torch.randperm(n, generator=gen), recipe.batch_size):
                lr = recipe.lr_at(step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                lrs.append(lr)
                idx = idx.to(device)
                loss = _step(model, opt, batch_loss(idx), recipe.grad_clip)
                loss_sum += loss.detach() * idx.numel()
                step += 1
            mean_loss = float(loss_sum) / n
            losses.append(mean_loss)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss became {mean_loss} in epoch {epoch}; lower TrainRecipe.lr "
                    f"(now {recipe.lr}) or check the inputs for NaN/inf"
                )
            if epoch in ckpt:
                snapshot(sum(lrs) / len(lrs))
            if progress:
                print(
                    f"epoch {epoch}/{recipe.epochs} loss {mean_loss:.4f} "
                    f"({time.perf_counter() - start:.1f}s)",
                    file=sys.stderr,
                )
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(model, seconds, checkpoints, checkpoint_lrs, seed, recipe, losses)


def save_weights(
    model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str]
) -> None:
    """Save a model's state_dict (or a state dict) to ``path`` as safetensors, atomically."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, safetensors_bytes(tensors))  # never a half-written weights file


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load safetensors weights from ``path`` into ``model`` (in place) and return it.

    Raises ValueError naming missing/unexpected keys or mismatched shapes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    state = load_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights in {path!r} do not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}; was the file saved from a different architecture?"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(
            f"weights in {path!r} have wrong shapes for {type(model).__name__}: "
            + "; ".join(bad)
            + ". Build the model with the same arguments as the saved one."
        )
    model.load_state_dict(state, strict=True)
    return model
