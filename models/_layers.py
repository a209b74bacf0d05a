"""Building blocks shared by the reference networks."""
from __future__ import annotations

from torch import nn

from graphfold.train.layer_folding import LayerFoldingActivation

ACTIVATIONS = ("relu", "folding")


def activation(kind: str, slope_init: float = 0.0) -> nn.Module:
    """``relu`` (plain form) or ``folding``: a Layer Folding activation with one slope per layer."""
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "folding":
        return LayerFoldingActivation(1, init=slope_init)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same'-style padding) followed by BatchNorm."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
