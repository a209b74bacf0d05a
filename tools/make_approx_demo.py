"""Build the approximate-folding demo: a ResNet-20-style net with planted near-identities, and its data.

The net is the CIFAR ResNet-20 layout (a 3x3 stem, three stages of three basic blocks at widths
16/32/64, global average pooling, a linear classifier) with PReLU activations. Planted:

* every PReLU slope is 0.999, as Layer Folding training leaves the activations it wants removed;
* the residual branches of all stage-1 blocks, the first (projection) block of stage 2 and the
  last block of stage 3 are scaled so that max|F| is about 1e-6 on the calibration data, as an
  epsilon-ResNet gate leaves the blocks it switched off.

BatchNorm statistics are set by a pass over the calibration inputs, so activations have a
realistic scale. Exported with the TorchScript exporter (``dynamo=False``), opset 17, dynamic
batch. ``cal.npz`` holds the inputs under the graph input's name and ``labels``: the original
model's own top-1 predictions (there is no trained task here), so accuracy "after" says how
often the folded model still agrees with it.

    python tools/make_approx_demo.py OUT_DIR
    graphfold OUT_DIR/resnet20_approx.onnx -o OUT_DIR/folded.onnx --calibration OUT_DIR/cal.npz \\
        --tolerance 1e-2 --epsilon 1e-4 --snap-slope 0.99
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch
from torch import nn

SLOPE = 0.999
BRANCH_MAX = 1e-6
INPUT, OUTPUT = "input", "logits"
# (stage, block) whose residual branch is planted at max|F| ~ BRANCH_MAX.
TINY = {(0, 0), (0, 1), (0, 2), (1, 0), (2, 2)}


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.post = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.shortcut(x) + self.branch(x))


class ResNet20(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for index in range(3):
                blocks.append(Block(cin, cout, 2 if stage and not index else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def block(self, stage: int, index: int) -> Block:
        return self.blocks[3 * stage + index]


def build(samples: int, seed: int, size: int = 32) -> tuple[ResNet20, np.ndarray]:
    torch.manual_seed(seed)
    inputs = np.random.default_rng(seed).standard_normal((samples, 3, size, size)).astype(np.float32)
    model = ResNet20()
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            nn.init.constant_(module.weight, SLOPE)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
            module.momentum = None  # cumulative average: one pass sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    model.eval()
    for stage, index in sorted(TINY):
        _plant(model, model.block(stage, index), inputs)
    return model, inputs


def _plant(model: ResNet20, block: Block, inputs: np.ndarray) -> None:
    """Scale the branch's last BatchNorm so that max|F| on ``inputs`` is ``BRANCH_MAX``."""
    seen = []
    hook = block.branch.register_forward_hook(lambda _m, _i, out: seen.append(out.abs().max().item()))
    with torch.no_grad():
        model(torch.from_numpy(inputs))
        bn = block.branch[-1]
        factor = BRANCH_MAX / max(seen)
        bn.weight.mul_(factor)
        bn.bias.mul_(factor)
    hook.remove()


def export(model: ResNet20, path: str, size: int = 32) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is chosen on purpose
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), path, dynamo=False, opset_version=17,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where to write resnet20_approx.onnx and cal.npz")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    model, inputs = build(args.samples, args.seed, args.size)
    with torch.no_grad():
        labels = model(torch.from_numpy(inputs)).argmax(dim=1).numpy()
    model_path = os.path.join(args.out_dir, "resnet20_approx.onnx")
    export(model, model_path, args.size)
    np.savez(os.path.join(args.out_dir, "cal.npz"), **{INPUT: inputs, "labels": labels})
    print(f"wrote {model_path} and {os.path.join(args.out_dir, 'cal.npz')} ({args.samples} samples); "
          f"planted: PReLU slopes {SLOPE}, {len(TINY)} branches at max|F| {BRANCH_MAX:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
