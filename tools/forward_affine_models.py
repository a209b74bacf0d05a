"""Export two published mobile architectures whose affine ops sit in front of their convs, to measure
fold-affine-forward on them (needs torch: ``pip install -e .[train]``).

* ``pplcnet_hswish.onnx``: PP-LCNet x1.0 (Cui et al. 2021, arXiv 2109.15099): depthwise-separable
  blocks with a hand-built HardSwish ``x * relu6(x + 3) / 6``, as PP-OCR exports it, so every ``/ 6``
  is read by the next conv.
* ``pplcnetv3_affine.onnx``: PP-LCNetV3-style blocks: each activation followed by a learnable scale
  and shift (``LearnableAffineBlock``, Mul then Add) before the next conv.

Weights are random but BatchNorm statistics and the learnable affines are randomised too, so no
fold is trivial. Then, for example:

    python tools/forward_affine_models.py out/
    graphfold out/pplcnet_hswish.onnx -o out/pplcnet_hswish.folded.onnx
    graphfold bench out/pplcnet_hswish.onnx out/pplcnet_hswish.folded.onnx --rounds 30
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
import torch.nn.functional as F

# PP-LCNet x1.0: (kernel, in, out, stride, squeeze-excite) per depthwise-separable block.
LCNET_BLOCKS = [(3, 32, 64, 1, False), (3, 64, 128, 2, False), (3, 128, 128, 1, False), (3, 128, 256, 2, False),
                (3, 256, 256, 1, False), (3, 256, 512, 2, False)] + [(5, 512, 512, 1, False)] * 5 + \
               [(5, 512, 1024, 2, True), (5, 1024, 1024, 1, True)]


class HandHardSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3) / 6


class LearnableAffine(nn.Module):
    """PP-LCNetV3's LearnableAffineBlock: scale * x + bias, two learnable scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(1).uniform_(0.8, 1.2))
        self.bias = nn.Parameter(torch.empty(1).uniform_(-0.1, 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


def conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int, affine: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
              HandHardSwish() if not affine else nn.Hardswish()]
    if affine:
        layers.append(LearnableAffine())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


def lcnet(affine: bool) -> nn.Module:
    layers = [conv_bn_act(3, 16, 3, 2, 1, affine)]
    cin = 16
    for k, c_in, c_out, stride, se in LCNET_BLOCKS:
        c_in, c_out = c_in // 2, c_out // 2  # x0.5 width keeps the export and the benchmark quick
        layers += [conv_bn_act(cin, cin, k, stride, cin, affine)]
        if se:
            layers.append(SqueezeExcite(cin))
        layers += [conv_bn_act(cin, c_out, 1, 1, 1, affine)]
        cin = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    net = nn.Sequential(*layers)
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the .onnx files to")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    x = torch.randn(1, 3, 224, 224)
    for name, affine in (("pplcnet_hswish", False), ("pplcnetv3_affine", True)):
        path = os.path.join(args.out, f"{name}.onnx")
        torch.onnx.export(lcnet(affine), (x,), path, opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamo=False)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
