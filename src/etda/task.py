"""What is attributed: the per-example loss, the model output f and TRAK's Q term.

A task turns raw model outputs into per-example scalars. It never runs the model
itself; featurizers call the model (functionally or with hooks) and hand the
outputs to the task. Every function maps a batch of model outputs ``(B, ...)`` and
targets ``(B, ...)`` to a vector ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Target = Literal["loss", "output"]
ParamSelector = str | Sequence[str] | Callable[[str], bool]
IGNORE_INDEX = -100  # targets with this value count nowhere (padding), as in PyTorch and HF


@runtime_checkable
class Task(Protocol):
    """What etda attributes, for any model: implement ``loss``, ``output`` and ``check``
    (``name`` for the records); ``q`` and ``forward`` are optional.

    * ``forward(model, x)``: the model's outputs on inputs ``x`` (a tensor or a dict of
      tensors). Default: ``model(x)``, or ``model(**x)`` for a dict; a tuple's first element
      or a HuggingFace ``ModelOutput``'s ``logits`` is what the other functions receive.
    * ``loss(out, y) -> (B,)``: the per-example training loss (what IF, Grad-Dot, Grad-Cos
      and TracIn differentiate).
    * ``output(out, y) -> (B,)``: the attributed scalar (TRAK differentiates it; LDS
      ground truths measure it).
    * ``q(out, y) -> (B,)``: TRAK's Q weight; default ones (TRAK's linear-model case).
    * ``check(out, y)``: raise ``ValueError`` saying what does not fit.
    * ``sample(out, u) -> y``: targets drawn from the model at uniforms ``u`` (the sampled
      Fisher of K-FAC/EK-FAC); optional.
    """

    name: str

    def loss(self, out: Tensor, y: Tensor) -> Tensor: ...

    def output(self, out: Tensor, y: Tensor) -> Tensor: ...

    def check(self, out: Tensor, y: Tensor) -> None: ...


def scalar(task: Any, target: Target, out: Tensor, y: Tensor) -> Tensor:
    """The per-example scalar ``(B,)`` a method differentiates: the loss or the output."""
    return task.loss(out, y) if target == "loss" else task.output(out, y)


def q_weights(task: Any, out: Tensor, y: Tensor) -> Tensor:
    """TRAK's Q ``(B,)``: the task's, or ones when it has none."""
    q = getattr(task, "q", None)
    return q(out, y) if q is not None else out.new_ones(out.shape[0])


class ClassificationTask:
    """Classification with logits ``(B, C)`` and integer labels ``(B,)`` (or soft / one-hot
    label distributions ``(B, C)``, whose most probable class is the attributed one).

    * loss: cross-entropy of the true class (of the label distribution for soft labels).
    * output: TRAK's margin ``log(p / (1 - p))`` of the true class, computed stably as
      ``logit_y - logsumexp(other logits)``.
    * q: ``1 - p_y`` (TRAK's Q term).
    """

    name = "classification"

    def check(self, out: Tensor, y: Tensor) -> None:
        if out.ndim != 2:
            raise ValueError(
                f"classification expects logits of shape (B, C), got {tuple(out.shape)}"
            )
        if y.is_floating_point():
            if y.shape != out.shape:
                raise ValueError(
                    f"soft labels must have the logits' shape {tuple(out.shape)}, got "
                    f"{tuple(y.shape)}"
                )
            return
        if y.ndim != 1 or y.shape[0] != out.shape[0]:
            raise ValueError(f"labels must have shape ({out.shape[0]},), got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise ValueError(
                f"labels out of range: model has {out.shape[1]} classes, labels span "
                f"[{int(y.min())}, {int(y.max())}]"
            )

    @staticmethod
    def _hard(y: Tensor) -> Tensor:
        return y.argmax(-1) if y.is_floating_point() else y

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        target = y.to(out.dtype) if y.is_floating_point() else y
        return nn.functional.cross_entropy(out, target, reduction="none")

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        y = self._hard(y)
        correct = out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        others = out.scatter(-1, y.unsqueeze(-1), float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def q(self, out: Tensor, y: Tensor) -> Tensor:
        y = self._hard(y)
        return 1.0 - torch.softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def sample(self, out: Tensor, u: Tensor) -> Tensor:
        """Labels drawn from the model's predictive distribution by inverse CDF at the uniform
        draws ``u`` (one per label): the targets of the true (sampled) Fisher."""
        return _inverse_cdf(out, u)


class SequenceTask:
    """Next-token prediction with logits ``(B, T, V)`` and next-token targets ``(B, T)``;
    targets equal to ``-100`` (padding) count nowhere: not in the loss, the output or Q, so
    padded positions never change a score.

    * loss: mean cross-entropy over the sequence's counted tokens.
    * output: sequence log-likelihood (sum of the counted tokens' log-probabilities).
    * q: ``1 - exp(mean token log-probability)``, i.e. one minus the geometric-mean
      probability of the sequence's tokens. This generalises ``1 - p`` of one
      class to a sequence: it is the weight a one-step Newton update gives a sequence
      whose tokens are each predicted with probability ``p``.
    """

    name = "sequence"

    def check(self, out: Tensor, y: Tensor) -> None:
        if out.ndim != 3 or y.shape != out.shape[:2]:
            raise ValueError(
                f"sequence task expects logits (B, T, V) and targets (B, T); got "
                f"{tuple(out.shape)} and {tuple(y.shape)}"
            )
        counted = y[y != IGNORE_INDEX]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= out.shape[-1]):
            raise ValueError(
                f"target tokens out of range [0, {out.shape[-1]}) (padding must be -100)"
            )

    def _token_logp(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        keep = y != IGNORE_INDEX
        logp = torch.log_softmax(out, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1))
        return logp.squeeze(-1) * keep, keep

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        logp, keep = self._token_logp(out, y)
        return -logp.sum(-1) / keep.sum(-1).clamp_min(1)

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        return self._token_logp(out, y)[0].sum(-1)

    def q(self, out: Tensor, y: Tensor) -> Tensor:
        logp, keep = self._token_logp(out, y)
        return 1.0 - (logp.sum(-1) / keep.sum(-1).clamp_min(1)).exp()

    def sample(self, out: Tensor, u: Tensor) -> Tensor:
        """Next tokens drawn from the model at the uniforms ``u (B, T)``."""
        return _inverse_cdf(out, u)


class RegressionTask:
    """Regression with predictions ``(B,)`` or ``(B, k)`` (``(B, 1)`` is read as ``(B,)``)
    and float targets of the same shape.

    * loss: half the squared error (summed over outputs), so its Hessian is ``X^T X`` for a
      linear model;
    * output: the prediction (summed over outputs);
    * q: ones (TRAK's linear-model case: the output's gradient is its own linearization).

    Signs: loss-based methods (IF, Grad-Dot, TracIn) score positive when the training example
    lowers the test loss; TRAK differentiates the output, so for regression its positive
    scores *raise the prediction* (TRAK's kernel weights), whichever way the target lies.
    """

    name = "regression"

    @staticmethod
    def _flat(out: Tensor) -> Tensor:
        return out.squeeze(-1) if out.ndim == 2 and out.shape[1] == 1 else out

    def check(self, out: Tensor, y: Tensor) -> None:
        if not y.is_floating_point():
            raise ValueError(f"regression targets must be floating point, got {y.dtype}")
        if self._flat(out).shape != self._flat(y).shape:
            raise ValueError(
                f"regression predictions {tuple(out.shape)} and targets {tuple(y.shape)} "
                "differ in shape (float targets are read as regression: pass integer labels "
                "for classification)"
            )

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        err = (self._flat(out) - self._flat(y).to(out.dtype)) ** 2
        return 0.5 * (err if err.ndim == 1 else err.sum(-1))

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        out = self._flat(out)
        return out if out.ndim == 1 else out.sum(-1)

    def q(self, out: Tensor, y: Tensor) -> Tensor:
        return out.new_ones(out.shape[0])


class FunctionTask:
    """A task from functions: ``loss(out, y) -> (B,)`` and ``output(out, y) -> (B,)`` (default:
    minus the loss), optional ``q``, ``check`` and ``forward(model, x)``."""

    def __init__(
        self,
        loss: Callable[[Tensor, Tensor], Tensor],
        output: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        q: Callable[[Tensor, Tensor], Tensor] | None = None,
        check: Callable[[Tensor, Tensor], None] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        name: str = "custom",
    ) -> None:
        if not callable(loss):
            raise TypeError("make_task needs a loss function loss(out, y) -> (B,)")
        self._loss, self._output, self._check = loss, output, check
        self.name = name
        if q is not None:
            self.q = q
        if forward is not None:
            self.forward = forward

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return _per_example(self._loss(out, y), out, "loss")

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        if self._output is None:
            return -self.loss(out, y)
        return _per_example(self._output(out, y), out, "output")

    def check(self, out: Tensor, y: Tensor) -> None:
        if self._check is not None:
            self._check(out, y)
        self.loss(out, y)  # the loss must give one value per example


def make_task(
    loss: Callable[[Tensor, Tensor], Tensor],
    output: Callable[[Tensor, Tensor], Tensor] | None = None,
    **kw: Any,
) -> FunctionTask:
    """A task from two functions (see :class:`FunctionTask`)."""
    return FunctionTask(loss, output, **kw)


def _per_example(v: Tensor, out: Tensor, what: str) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (out.shape[0],):
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"the task's {what} must return one value per example, shape ({out.shape[0]},); "
            f"got {shape} (use reduction='none')"
        )
    return v


def check_task(task: Any) -> None:
    """Refuse an object that is not a task, naming what it lacks."""
    missing = [f for f in ("loss", "output", "check") if not callable(getattr(task, f, None))]
    if missing:
        raise TypeError(
            f"task {type(task).__name__} lacks {', '.join(missing)}: a task needs loss(out, y), "
            "output(out, y) and check(out, y) (see etda.Task), or build one with etda.make_task"
        )


def _inverse_cdf(logits: Tensor, u: Tensor) -> Tensor:
    """Categorical draws ``(...)`` from ``logits (..., C)`` at uniforms ``u (...)`` in [0, 1)."""
    cdf = torch.softmax(logits.detach().to(torch.float64), dim=-1).cumsum(-1)
    y = torch.searchsorted(cdf, u.to(torch.float64).unsqueeze(-1).contiguous()).squeeze(-1)
    return y.clamp_(max=logits.shape[-1] - 1).to(torch.long)


def default_task(y: Tensor) -> Task:
    """The built-in task for targets ``y``: integer ``(B,)`` -> classification, integer
    ``(B, T)`` -> sequence, float ``(B, C)`` rows that are distributions -> classification
    with soft labels, any other float -> regression."""
    if not y.is_floating_point():
        return SequenceTask() if y.ndim == 2 else ClassificationTask()
    ones = torch.ones(y.shape[0], dtype=y.dtype)
    rows_are_distributions = (
        y.ndim == 2
        and y.shape[1] > 1
        and bool((y >= 0).all())
        and torch.allclose(y.sum(1), ones, atol=1e-4)
    )
    return ClassificationTask() if rows_are_distributions else RegressionTask()


def select_parameters(model: nn.Module, params: ParamSelector = "all") -> list[str]:
    """Names of the attributed parameters of ``model``.

    ``params`` is ``"all"`` (every parameter that requires grad), ``"adapters"`` (LoRA
    adapter weights only), a list of names or name prefixes, or a predicate on names.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params == "all":
        chosen = names
    elif params == "adapters":
        chosen = [n for n in names if "lora_" in n]
        if not chosen:
            raise ValueError("params='adapters' but the model has no LoRA adapter parameters")
    elif callable(params):
        chosen = [n for n in names if params(n)]
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        chosen = [n for n in names if any(n == w or n.startswith(w + ".") for w in wanted)]
        missing = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in names)]
        if missing:
            raise ValueError(f"unknown parameter names {missing}; the model has {names[:8]}...")
    if not chosen:
        raise ValueError("no parameters selected for attribution")
    return chosen
