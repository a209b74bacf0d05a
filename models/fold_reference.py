"""Reference networks that exercise each of graphfold's exact folds (random weights, BN kept).

Each builder returns an eval-mode torch module whose BatchNorm layers carry non-trivial
running statistics, so folding them is a real test:

- ``repvgg``: RepVGG-A-style blocks, 3x3 + 1x1 + BN-identity branches summed, then ReLU.
- ``mobilenetv2_linear``: MobileNetV2 (width 1.0) whose inverted residuals have no
  activations, so each expand-depthwise-project block is one linear chain.
- ``mobilenetv2_relocated``: the same with each block's padding moved to its expand conv
  (LayerMerge's relocation), which makes the chain merge exact without a border correction.
- ``resnet_relocated``: a ResNet whose blocks are linear 3x3-3x3 chains with the padding on
  the first conv (pad 2, then pad 0), so ``x + conv(conv(x))`` folds into one 5x5.
- ``unit_slope``: a VGG-style stack whose PRelu/LeakyRelu slopes are exactly 1.

``repvgg_small`` is the sample bundled as models/repvgg_small.onnx (``python -m models.fold_reference``).
``export(name, path)`` writes one as ONNX (opset 17, dynamic batch, BatchNorm unfolded).
"""
from __future__ import annotations

import torch
from torch import nn

IMAGE = 224


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None, groups: int = 1) -> nn.Sequential:
    pad = k // 2 if pad is None else pad
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), _bn(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride)
        self.pointwise = _conv_bn(cin, cout, 1, stride)
        self.identity = _bn(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, channels: int, classes: int = 1000) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def repvgg(widths: tuple[int, ...] = (24, 48, 96, 192, 640), depths: tuple[int, ...] = (1, 2, 4, 14, 1),
           classes: int = 1000) -> nn.Module:
    """RepVGG-A0 layout (stages of 1, 2, 4, 14, 1 blocks) at half width by default."""
    layers, cin = [], 3
    for width, depth in zip(widths, depths):
        for i in range(depth):
            layers.append(RepVGGBlock(cin, width, 2 if i == 0 else 1))
            cin = width
    return Classifier(nn.Sequential(*layers), cin, classes)


def repvgg_small() -> nn.Module:
    """The bundled sample: a small RepVGG for 32x32 inputs and 10 classes."""
    return repvgg(widths=(16, 32, 64), depths=(1, 3, 3), classes=10)


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1, each with BN and no activation."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, relocate: bool) -> None:
        super().__init__()
        hidden = cin * expand
        # Relocated: the chain's first conv pads by 1 and the depthwise conv not at all.
        # As in MobileNetV2, a block with expansion 1 has no expand conv.
        layers = [_conv_bn(cin, hidden, 1, pad=1 if relocate else 0)] if expand != 1 else []
        relocated_dw = relocate and expand != 1
        layers += [_conv_bn(hidden, hidden, 3, stride, pad=0 if relocated_dw else 1, groups=hidden),
                   _conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def _mobilenetv2(relocate: bool) -> nn.Module:
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2), nn.ReLU6()]
    cin = 32
    for expand, cout, repeats, stride in settings:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, expand, stride if i == 0 else 1, relocate))
            cin = cout
    layers += [_conv_bn(cin, 1280, 1), nn.ReLU6()]
    return Classifier(nn.Sequential(*layers), 1280)


def mobilenetv2_linear() -> nn.Module:
    return _mobilenetv2(relocate=False)


def mobilenetv2_relocated() -> nn.Module:
    return _mobilenetv2(relocate=True)


class LinearBasicBlock(nn.Module):
    """x + BN(conv(BN(conv(x)))) with both 3x3 convs linear and the padding on the first."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.chain = nn.Sequential(_conv_bn(channels, channels, 3, pad=2), _conv_bn(channels, channels, 3, pad=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.chain(x))


def resnet_relocated() -> nn.Module:
    layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2), nn.ReLU()]
    cin = 32
    for width in (32, 64, 128):
        if width != cin:
            layers += [_conv_bn(cin, width, 3, 2), nn.ReLU()]
            cin = width
        layers += [LinearBasicBlock(width) for _ in range(2)]
    return Classifier(nn.Sequential(*layers), cin)


def unit_slope() -> nn.Module:
    """VGG-style: conv-BN-PRelu(1)-conv1x1-BN-LeakyRelu(1) groups between ReLU stages."""
    layers: list[nn.Module] = []
    cin = 3
    for width in (32, 64, 128):
        prelu = nn.PReLU(width)
        with torch.no_grad():
            prelu.weight.fill_(1.0)
        layers += [_conv_bn(cin, width, 3, 2), prelu, _conv_bn(width, width, 1), nn.LeakyReLU(1.0),
                   _conv_bn(width, width, 3), nn.ReLU()]
        cin = width
    return Classifier(nn.Sequential(*layers), cin)


BUILDERS = {
    "repvgg": repvgg,
    "repvgg_small": repvgg_small,
    "mobilenetv2_linear": mobilenetv2_linear,
    "mobilenetv2_relocated": mobilenetv2_relocated,
    "resnet_relocated": resnet_relocated,
    "unit_slope": unit_slope,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def export(name: str, path: str, image: int = IMAGE, seed: int = 0) -> None:
    """Write reference network ``name`` to ``path`` with BatchNorm kept and a dynamic batch."""
    model = build(name, seed)
    torch.onnx.export(model, torch.randn(1, 3, image, image), path, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


if __name__ == "__main__":
    import os

    export("repvgg_small", os.path.join(os.path.dirname(os.path.abspath(__file__)), "repvgg_small.onnx"), image=32)
