"""Published CNN architectures written out in PyTorch, for benchmarks on models shaped like real ones.

ResNet-18 follows torchvision's ``resnet18`` layer for layer; MobileNetV3-Small follows
torchvision's ``mobilenet_v3_small`` (its block table, squeeze-excite widths and head), with
``hand_built=True`` writing HardSwish and HardSigmoid as ``x * relu6(x + 3) / 6`` and
``relu6(x + 3) / 6``, as Paddle exports them. No pretrained weights (nothing is downloaded):
``trained_looking`` gives a network the weight and BatchNorm statistics a trained one has.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _bn_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ---------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_bn_conv(cin, cout, 3, stride), nn.ReLU(inplace=True), *_bn_conv(cout, cout, 3))
        self.down = nn.Sequential(*_bn_conv(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.down(x))


def resnet18(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [*_bn_conv(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- MobileNetV3-Small

class HandHardswish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class HandHardsigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: nn.Module) -> None:
        super().__init__()
        hidden = _divisible(channels / 4)
        self.fc1, self.fc2, self.gate = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(scale))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expand: int, cout: int, se: bool, act: type, gate: type,
                 stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expand != cin:
            layers += [*_bn_conv(cin, expand, 1), act()]
        layers += [*_bn_conv(expand, expand, kernel, stride, groups=expand), act()]
        if se:
            layers.append(SqueezeExcite(expand, gate()))
        layers += _bn_conv(expand, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# kernel, expanded width, output width, squeeze-excite, HardSwish (else ReLU), stride
SMALL_BLOCKS = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))


def mobilenet_v3_small(classes: int = 1000, hand_built: bool = False) -> nn.Module:
    swish, gate = (HandHardswish, HandHardsigmoid) if hand_built else (nn.Hardswish, nn.Hardsigmoid)
    layers: list[nn.Module] = [*_bn_conv(3, 16, 3, 2), swish()]
    cin = 16
    for kernel, expand, cout, se, hard, stride in SMALL_BLOCKS:
        layers.append(InvertedResidual(cin, kernel, expand, cout, se, swish if hard else nn.ReLU, gate, stride))
        cin = cout
    layers += [*_bn_conv(cin, 576, 1), swish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
               nn.Linear(576, 1024), swish(), nn.Dropout(0.2), nn.Linear(1024, classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- weights

@torch.no_grad()
def trained_looking(net: nn.Module, input_shape: Sequence[int], batches: int = 3, batch: int = 8) -> nn.Module:
    """He-initialized weights, BatchNorm scale in [0.5, 1.5] and shift N(0, 0.1), and BatchNorm
    statistics averaged over ``batches`` random batches in training mode; returned in eval mode."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.05)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.1)
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    net.train()
    for _ in range(batches):
        net(torch.randn(batch, *input_shape[1:]))
    return net.eval()
