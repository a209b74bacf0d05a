#!/usr/bin/env python
"""Write a folder of third-party-style models for ``tools/peer_benchmark.py --models DIR``.

Two sources, both reachable without the internet:

- onnx's bundled models (``onnx/backend/test/data/light``: ResNet-50, DenseNet-121, Inception v1,
  ShuffleNet, SqueezeNet, ...). Their weights are ConstantOfShape fills of 0.02, under which
  every class gets the same logit; they are written with seeded random weights instead (as
  ``tools/corpus_run.py`` does), so outputs and errors mean something. Needs only onnx.
- published architectures written out here in PyTorch and exported the way users export
  (``torch.onnx.export``, opset 17, dynamic batch): a ResNet-18 (torchvision's layout) and a
  MobileNetV3-Small (HardSwish, squeeze-excite with HardSigmoid), the latter twice: with
  ``nn.Hardswish`` (one ONNX op) and with the hand-built ``x * relu6(x + 3) / 6`` that Paddle
  exports carry. Weights are "trained-looking": He-initialized, BatchNorm scale and shift
  random, BatchNorm statistics accumulated over random batches in training mode. Needs torch
  (``pip install -e '.[train]'``).

A ``shapes.json`` beside the models gives each file's input shape.

    python tools/real_models.py DIR [--bundled resnet50,squeezenet,...] [--no-torch]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnx  # noqa: E402

from corpus_run import CORPUS, with_random_weights  # noqa: E402

# The light models that run in seconds on one core; VGG-19, AlexNet and ZFNet-512 carry 0.5-2 GB
# of fully connected weights and take minutes per benchmark.
BUNDLED = ("resnet50", "densenet121", "inception_v1", "shufflenet", "squeezenet")
IMAGE = [1, 3, 224, 224]


def write_bundled(folder: str, names: list[str]) -> dict[str, dict[str, list[int]]]:
    shapes = {}
    for name in names:
        model = onnx.load(os.path.join(CORPUS, "light", f"light_{name}.onnx"))
        randomized = with_random_weights(model)
        file = f"onnx_{name}.onnx"
        onnx.save(randomized, os.path.join(folder, file))
        shapes[file] = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                        for vi in randomized.graph.input
                        if vi.name not in {i.name for i in randomized.graph.initializer}}
    return shapes


def write_torch(folder: str) -> dict[str, dict[str, list[int]]]:
    import torch

    from torch_architectures import mobilenet_v3_small, resnet18, trained_looking

    shapes = {}
    for file, build in (("torch_resnet18.onnx", resnet18),
                        ("torch_mobilenetv3_small.onnx", lambda: mobilenet_v3_small(hand_built=False)),
                        ("torch_mobilenetv3_small_handmade_hswish.onnx", lambda: mobilenet_v3_small(hand_built=True))):
        torch.manual_seed(0)
        net = trained_looking(build(), IMAGE)
        torch.onnx.export(net, (torch.zeros(*IMAGE),), os.path.join(folder, file), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        shapes[file] = {"input": IMAGE}
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--bundled", default=",".join(BUNDLED),
                        help=f"onnx light models to include (default {','.join(BUNDLED)}; '' for none)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch exports")
    args = parser.parse_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    shapes = write_bundled(args.folder, [n for n in args.bundled.split(",") if n])
    if not args.no_torch:
        shapes.update(write_torch(args.folder))
    with open(os.path.join(args.folder, "shapes.json"), "w") as out:
        json.dump(shapes, out, indent=1)
    print(f"wrote {len(shapes)} models and shapes.json to {args.folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
