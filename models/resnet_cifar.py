"""CIFAR-style ResNet (He et al. 2016, section 4.2): 6n+2 layers, widths w, 2w, 4w.

Each unit is ``post(shortcut(x) + BN(conv3x3(act(BN(conv3x3(x))))))`` wrapped in
:class:`graphfold.train.residual.Residual`; the first unit of stages 2 and 3 downsamples with a
strided conv and a 1x1-conv projection shortcut. ``unit`` picks what the residual carries:

* ``plain``: nothing, the ordinary ResNet;
* ``epsilon``: an epsilon-ResNet gate on the branch;
* ``implosion``: a Network Implosion priority scale on the branch;
* ``fade``: a skip weight for skip fading on every unit; at weight 0 a projection shortcut's
  1x1 conv is gone along with the Add.

``activation="folding"`` swaps every ReLU for a Layer Folding activation (the foldable form).
"""
from __future__ import annotations

from torch import nn

from graphfold.train.eps_resnet import EpsilonGate
from graphfold.train.implosion import PriorityScale
from graphfold.train.residual import Residual
from graphfold.train.skip_fading import SkipWeight
from models._layers import activation as make_activation
from models._layers import conv_bn

__all__ = ["resnet20", "resnet56", "resnet_cifar"]

UNITS = ("plain", "epsilon", "implosion", "fade")


def _unit(cin: int, cout: int, stride: int, unit: str, act: str, eps: float) -> Residual:
    branch = nn.Sequential(*conv_bn(cin, cout, 3, stride), make_activation(act), *conv_bn(cout, cout, 3))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
    gate = {"epsilon": lambda: EpsilonGate(eps), "implosion": PriorityScale}.get(unit, lambda: None)()
    skip = SkipWeight(1.0) if unit == "fade" else None
    # With ReLUs every unit's input is the output of a ReLU (the stem's or the previous unit's).
    return Residual(branch, shortcut, post=make_activation(act), gate=gate, skip=skip,
                    input_nonnegative=act == "relu")


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 1,
                 unit: str = "plain", activation: str = "relu", eps: float = 2.5) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*conv_bn(in_channels, width, 3), make_activation(activation))
        units, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(_unit(cin, cout, stride, unit, activation, eps))
                cin = cout
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.units(self.stem(x))).flatten(1))


def resnet_cifar(depth: int = 20, **kwargs) -> ResNetCifar:
    return ResNetCifar(depth, **kwargs)


def resnet20(**kwargs) -> ResNetCifar:
    return ResNetCifar(20, **kwargs)


def resnet56(**kwargs) -> ResNetCifar:
    return ResNetCifar(56, **kwargs)
