"""What is attributed: the per-example loss, the model output f and TRAK's Q term.

A task turns raw model outputs into per-example scalars. It never runs the model
itself; featurizers call the model (functionally or with hooks) and hand the
outputs to the task. Every function maps a batch of model outputs ``(B, ...)`` and
targets ``(B, ...)`` to a vector ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Target = Literal["loss", "output"]
ParamSelector = str | Sequence[str] | Callable[[str], bool]


class ClassificationTask:
    """Classification with logits ``(B, C)`` and integer labels ``(B,)``.

    * loss: cross-entropy of the true class.
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
        if y.ndim != 1 or y.shape[0] != out.shape[0]:
            raise ValueError(f"labels must have shape ({out.shape[0]},), got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise ValueError(
                f"labels out of range: model has {out.shape[1]} classes, labels span "
                f"[{int(y.min())}, {int(y.max())}]"
            )

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, y, reduction="none")

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        correct = out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        others = out.scatter(-1, y.unsqueeze(-1), float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def q(self, out: Tensor, y: Tensor) -> Tensor:
        return 1.0 - torch.softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def scalar(self, target: Target, out: Tensor, y: Tensor) -> Tensor:
        return self.loss(out, y) if target == "loss" else self.output(out, y)

    def sample(self, out: Tensor, u: Tensor) -> Tensor:
        """Labels drawn from the model's predictive distribution by inverse CDF at the uniform
        draws ``u`` (one per label): the targets of the true (sampled) Fisher."""
        return _inverse_cdf(out, u)


class SequenceTask:
    """Next-token prediction with logits ``(B, T, V)`` and next-token targets ``(B, T)``.

    * loss: mean token cross-entropy of the sequence.
    * output: sequence log-likelihood (sum of token log-probabilities).
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
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[-1]):
            raise ValueError(f"target tokens out of range [0, {out.shape[-1]})")

    def _token_logp(self, out: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return -self._token_logp(out, y).mean(-1)

    def output(self, out: Tensor, y: Tensor) -> Tensor:
        return self._token_logp(out, y).sum(-1)

    def q(self, out: Tensor, y: Tensor) -> Tensor:
        return 1.0 - self._token_logp(out, y).mean(-1).exp()

    def scalar(self, target: Target, out: Tensor, y: Tensor) -> Tensor:
        return self.loss(out, y) if target == "loss" else self.output(out, y)

    def sample(self, out: Tensor, u: Tensor) -> Tensor:
        """Labels drawn from the model's predictive distribution by inverse CDF at the uniform
        draws ``u`` (one per label): the targets of the true (sampled) Fisher."""
        return _inverse_cdf(out, u)


Task = ClassificationTask | SequenceTask


def _inverse_cdf(logits: Tensor, u: Tensor) -> Tensor:
    """Categorical draws ``(...)`` from ``logits (..., C)`` at uniforms ``u (...)`` in [0, 1)."""
    cdf = torch.softmax(logits.detach().to(torch.float64), dim=-1).cumsum(-1)
    y = torch.searchsorted(cdf, u.to(torch.float64).unsqueeze(-1).contiguous()).squeeze(-1)
    return y.clamp_(max=logits.shape[-1] - 1).to(torch.long)


def default_task(y: Tensor) -> Task:
    """Classification for labels ``(B,)``, the sequence task for targets ``(B, T)``."""
    return SequenceTask() if y.ndim == 2 else ClassificationTask()


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
