"""A small MobileNetV2 (Sandler et al. 2018) for 16x16 or 32x32 single-channel inputs.

Inverted residual: 1x1 expand (factor t) -> BN -> act -> 3x3 depthwise -> BN -> act -> 1x1 project
-> BN, with an identity skip when stride is 1 and channels match. ReLU stands in for ReLU6 in both
forms, so that the foldable form (``activation="folding"``, Layer Folding activations) differs
from the plain one only by the learnable slope; ReLU6 is not a PRelu.

``outer_activation`` (default: ``activation``) sets the stem's and the head's activation apart
from the blocks': folding those removes no conv here (the stem's output also feeds the first
skip, the head's feeds the pooling), so a Layer Folding run can keep them as free ReLUs.

When both activations of a block fold away, the block is one linear map: graphfold merges it into
a single dense 3x3 conv (with the skip added to its centre tap), which costs far fewer MACs and
memory traffic than the expanded block at t = 6.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from graphfold.train.residual import Residual
from models._layers import activation as make_activation
from models._layers import conv_bn

__all__ = ["DEFAULT_SETTING", "mobilenetv2_small"]

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
DEFAULT_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 2, 1),
)


def _inverted_residual(cin: int, cout: int, stride: int, t: int, act: str) -> nn.Module:
    hidden = cin * t
    layers: list[nn.Module] = []
    if t != 1:
        layers += [*conv_bn(cin, hidden, 1), make_activation(act)]
    layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), make_activation(act)]
    layers += conv_bn(hidden, cout, 1)
    branch = nn.Sequential(*layers)
    if stride == 1 and cin == cout:
        return Residual(branch)
    return branch


class MobileNetV2Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_channels: int = 16,
                 head_channels: int = 256, activation: str = "relu", outer_activation: str | None = None,
                 setting: Sequence[tuple[int, int, int, int]] = DEFAULT_SETTING) -> None:
        super().__init__()
        outer = activation if outer_activation is None else outer_activation
        self.stem = nn.Sequential(*conv_bn(in_channels, stem_channels, 3), make_activation(outer))
        blocks, cin = [], stem_channels
        for t, c, n, s in setting:
            for i in range(n):
                blocks.append(_inverted_residual(cin, c, s if i == 0 else 1, t, activation))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(cin, head_channels, 1), make_activation(outer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))


def mobilenetv2_small(**kwargs) -> MobileNetV2Small:
    return MobileNetV2Small(**kwargs)
