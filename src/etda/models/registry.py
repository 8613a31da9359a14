"""Model name registry with deterministic, RNG-isolated initialization."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from etda.models.logistic import LogisticRegression
from etda.models.mlp import MLP
from etda.models.resnet import ResNet9
from etda.models.transformer import CharTransformer


def _gpt2(**kwargs) -> nn.Module:
    from etda.models.gpt2 import GPT2LM  # local: it imports transformers

    return GPT2LM(**kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "resnet9": ResNet9,
    "char-transformer": CharTransformer,
    "gpt2": _gpt2,
}


def create_model(name: str, seed: int, **kwargs) -> nn.Module:
    """Build ``MODELS[name](**kwargs)`` with parameters initialized from ``seed``.

    The global torch RNG state is saved and restored around initialization, so creating a model
    neither depends on nor changes it. The model is returned in train() mode, on CPU.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return MODELS[name](**kwargs)
        except TypeError as exc:
            raise TypeError(f"bad keyword arguments for model {name!r}: {exc}") from exc
