"""Write the small sample models graphfold's README and tests run on.

``resnet_bn.onnx``: a ResNet-style CIFAR net (3x32x32 input, widths 16/32, one identity and one
projection residual block) exported from PyTorch with its BatchNormalization nodes kept, as
an exporter run without constant folding leaves them. Each BN has random non-trivial running
statistics, so folding it into its Conv is a real change of the weights. Deterministic: the
same torch version writes the same file.

    python models/make_samples.py            # writes models/resnet_bn.onnx
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)), shortcut a 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.first = conv_bn(cin, cout, 3, stride)
        self.second = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.second(torch.relu(self.first(x))) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, width, 3)
        self.blocks = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BN the statistics of a trained net: nothing close to the identity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)


def export(model: nn.Module, path: str, shape: tuple[int, ...]) -> None:
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it is the one that keeps BatchNorm nodes as is.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(*shape),), path, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def make_resnet_bn(path: str) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    export(model, path, (1, 3, 32, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=HERE, help="where to write the samples (default: models/)")
    args = parser.parse_args()
    path = os.path.join(args.out_dir, "resnet_bn.onnx")
    make_resnet_bn(path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
