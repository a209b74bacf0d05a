"""Networks written the way users write them, for the recipes that start from a user's model.

``PlainResNet`` is a CIFAR-style ResNet (He et al. 2016, section 4.2) in torchvision's coding style:
one ``nn.ReLU`` module called twice per block, ``out += identity``, a 1x1-conv projection where
the shape changes. ``keep`` removes units to build a shallower network of the same family, and
``skips=False`` builds the same network without any skip connection (a plain CNN).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "PlainResNet"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = skip
        self.downsample = None
        if skip and (stride != 1 or cin != cout):
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.skip:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class PlainResNet(nn.Module):
    """``depth = 6n + 2`` ResNet, widths ``w, 2w, 4w``; ``keep[i]`` False drops unit ``i``.

    Only units that keep the shape (stride 1, same width) may be dropped: the first unit of the
    second and third stages changes it and always stays.
    """

    def __init__(self, depth: int = 14, width: int = 12, num_classes: int = 34, in_channels: int = 1,
                 keep: Sequence[bool] | None = None, skips: bool = True) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        keep = [True] * (3 * n) if keep is None else list(keep)
        if len(keep) != 3 * n:
            raise ValueError(f"keep needs {3 * n} entries, got {len(keep)}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        units, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if not keep[stage * n + i]:
                    if stride != 1 or cin != cout:
                        raise ValueError(f"unit {stage * n + i} changes the shape and cannot be dropped")
                    continue
                units.append(BasicBlock(cin, cout, stride, skips))
                cin = cout
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def droppable(depth: int) -> list[int]:
        """Indices of the units that keep the shape (all but the first of the second and third stages)."""
        n = (depth - 2) // 6
        return [stage * n + i for stage in range(3) for i in range(n) if stage == 0 or i > 0]
