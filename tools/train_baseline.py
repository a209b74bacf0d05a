"""Baseline recipe: train the plain reference networks, fold them with graphfold, measure.

Each network (ReLU activations, ordinary residuals) is trained on the digits training split,
exported with BatchNorm kept, folded by graphfold (exact), evaluated with onnxruntime on the test
split, and timed against its own unfolded export: what graphfold gives on a network trained the
usual way, before any depth-removing method.

    python tools/train_baseline.py
"""
from __future__ import annotations

import _recipe_common as common


def main() -> None:
    p = common.parser("baseline", __doc__.splitlines()[0], epochs=30, arch=None)
    p.add_argument("--archs", nargs="+", default=["resnet20", "mobilenetv2", "vgg"],
                   choices=sorted(common.ARCHS), help="networks to train (default: all three small ones)")
    args = p.parse_args()
    data = common.setup(args)
    rows = []
    for arch in args.archs:
        args.arch = arch
        model = common.train_baseline(data, args)
        row = common.fold_and_measure(f"{arch} plain", model, data, args, stem=arch)
        row.reference_path = str(args.out / f"{arch}.onnx")
        rows.append(row)
    common.finish(rows, data, args, "Baseline: plain networks", versus_first=False,
                  note="Here each row's latency is its folded model over its own export with BatchNorm "
                       "nodes kept: what graphfold's exact folds alone give on a plainly trained network.")


if __name__ == "__main__":
    main()
