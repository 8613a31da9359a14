"""A small ResNet-9-style CNN for 28x28 (or 32x32) single-image inputs."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, pool: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU [-> 2x2 max pool] [-> Dropout if dropout > 0]."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    if dropout > 0.0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + block(x) with block = two conv-BN-ReLU layers of constant width [-> Dropout]."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))
        # No module at all for p=0, so the module tree stays as it was without the option.
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = x + self.block(x)
        return out if self.dropout is None else self.dropout(out)


class ResNet9(nn.Module):
    """ResNet-9 layout (as in TRAK's CIFAR-2 model) at a small width.

    (N, in_channels, 28, 28) -> prep (w) -> layer1 (2w, pool) + residual -> layer2 (4w, pool)
    -> layer3 (8w, pool) + residual -> adaptive max pool -> Dropout(p) -> Linear -> (N, C).
    Spatial sizes for 28x28: 28 -> 14 -> 7 -> 3 -> 1.

    ``dropout`` p > 0 puts one ``nn.Dropout(p)`` after every block (the ensembles' paper
    trains its ResNet-9 so): inside each of the first five blocks (last layer of a conv
    block, after the sum of a residual one) and, for the last residual block, the one before
    the head (after the global pool). Dropout has no parameters, so the parameter names and
    the seeded init do not depend on p. p = 0 adds no block layers: the model is then exactly
    the model without the option, with only the p=0 layer before the head.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        w, p = width, dropout
        self.features = nn.Sequential(
            conv_bn(in_channels, w, dropout=p),
            conv_bn(w, 2 * w, pool=True, dropout=p),
            Residual(2 * w, dropout=p),
            conv_bn(2 * w, 4 * w, pool=True, dropout=p),
            conv_bn(4 * w, 8 * w, pool=True, dropout=p),
            Residual(8 * w),  # its dropout is the one before the head
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        # Always a module (p=0: the identity, drawing no random numbers), so dropout
        # ensembles can mask it with a rate override.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))
