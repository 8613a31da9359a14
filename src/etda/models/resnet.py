"""A small ResNet-9-style CNN for 28x28 (or 32x32) single-image inputs."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU [-> 2x2 max pool]."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + block(x) with block = two conv-BN-ReLU layers of constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResNet9(nn.Module):
    """ResNet-9 layout (as in TRAK's CIFAR-2 model) at a small width.

    (N, in_channels, 28, 28) -> prep (w) -> layer1 (2w, pool) + residual -> layer2 (4w, pool)
    -> layer3 (8w, pool) + residual -> adaptive max pool -> Dropout(p) -> Linear -> (N, C).
    Spatial sizes for 28x28: 28 -> 14 -> 7 -> 3 -> 1.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        # Always a module (p=0: the identity, drawing no random numbers), so dropout
        # ensembles can mask it with a rate override.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))
