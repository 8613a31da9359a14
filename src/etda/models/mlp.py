"""Multi-layer perceptron with dropout after each hidden layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout(p)] per hidden layer -> Linear.

    Input (N, *) with prod(*) == in_features; output logits (N, num_classes). Layers are kept
    as plain ``nn.Linear`` / ``nn.Dropout`` modules in ``self.net`` so that hooks and dropout
    ensembles can find and replace them.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (128, 128),
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
