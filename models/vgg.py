"""A small VGG (Simonyan & Zisserman 2015): 3x3 conv -> BN -> act stacks between 2x2 max pools.

In the foldable form (``activation="folding"``) an activation that folds leaves two 3x3 convs in
sequence; after padding relocation graphfold merges them exactly into one 5x5 (fewer layers, but
more MACs, so this is the depth side of the trade, not the latency side).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models._layers import activation as make_activation
from models._layers import conv_bn

__all__ = ["DEFAULT_CONFIG", "vgg_small"]

DEFAULT_CONFIG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128)


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, activation: str = "relu",
                 config: Sequence[int | str] = DEFAULT_CONFIG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(cin, int(item), 3), make_activation(activation)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def vgg_small(**kwargs) -> VGGSmall:
    return VGGSmall(**kwargs)
