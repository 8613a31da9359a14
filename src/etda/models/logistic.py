"""Multinomial logistic regression."""

from __future__ import annotations

from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """Flatten, then one Linear layer: (N, *) with prod(*) == in_features -> logits (N, C)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.flatten(x))
