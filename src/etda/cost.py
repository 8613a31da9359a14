"""The cost meter: every attribution reports what it cost to train, serve and store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from etda.io import human_bytes


@dataclass
class Costs:
    """Seconds, bytes and FLOPs of one attribution.

    ``train_s``: training of every model and adapter the attribution needs (models given
    by the user count with the seconds passed as ``train_seconds``); serving is split into
    featurizing the training set, featurizing the test set and scoring; ``weights_bytes``
    are the checkpoints/adapters, ``feature_bytes`` the stored features.
    """

    train_s: float = 0.0
    featurize_train_s: float = 0.0
    featurize_test_s: float = 0.0
    score_s: float = 0.0
    weights_bytes: int = 0
    feature_bytes: int = 0
    flops: float = 0.0

    @property
    def serve_s(self) -> float:
        return self.featurize_train_s + self.featurize_test_s + self.score_s

    @property
    def bytes(self) -> int:
        return self.weights_bytes + self.feature_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "serve_s": self.serve_s, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict) -> Costs:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def __add__(self, other: Costs) -> Costs:
        return Costs(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def summary(self) -> str:
        return (
            f"train {self.train_s:.2f}s | serve {self.serve_s:.2f}s (featurize train "
            f"{self.featurize_train_s:.2f}s, test {self.featurize_test_s:.2f}s, score "
            f"{self.score_s:.2f}s) | {human_bytes(self.bytes)} | {self.flops:.3g} FLOPs"
        )


@contextmanager
def timer(costs: Costs, field_name: str) -> Iterator[None]:
    """Add the wall time of the block to ``costs.<field_name>``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(costs, field_name, getattr(costs, field_name) + time.perf_counter() - t0)


def weights_bytes(model: nn.Module, only: list[str] | None = None) -> int:
    """Bytes of a model's parameters (or of the named subset, e.g. adapters)."""
    named = dict(model.named_parameters())
    names = only if only is not None else list(named)
    return int(sum(named[n].numel() * named[n].element_size() for n in names))


def forward_flops(forward: Callable[[], object]) -> float:
    """FLOPs of one forward pass ``forward()`` (torch's FLOP counter; 0 if it cannot count)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - counting is best effort, never fatal
        return 0.0
