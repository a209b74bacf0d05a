"""Layer Folding recipe (Ben Dror et al., arXiv 2106.09309) on the small MobileNetV2, through graphfold.train.compress.

1. The plain network trained for ``--epochs`` (the baseline).
2. ``compress(method="layer-folding")`` on the same plain network, also ``--epochs`` in total:
   every ReLU becomes ``a*x + (1-a)*relu(x)`` (slopes from 0) trained with
   ``lambda * sum|1 - a^2|`` for 60% of the epochs; the most linear activations become
   identities, as many as keep validation accuracy within ``--budget`` points of the baseline's; the padding of
   each now-linear conv chain moves to its first conv; the rest of the epochs fine-tune.
3. Both exported with BatchNorm kept and folded by graphfold (exact default, then ``fold_all``),
   evaluated on the test split and timed against the folded baseline.

    python tools/train_layer_folding.py
"""
from __future__ import annotations

import _recipe_common as common


def main() -> None:
    p = common.parser("layer_folding", __doc__.splitlines()[0], epochs=30, arch="mobilenetv2")
    p.add_argument("--lam", type=float, default=1.0, help="slope regularizer weight (paper: 0.25)")
    p.add_argument("--budget", type=float, default=0.5, help="validation accuracy the snapping may cost, points")
    args = p.parse_args()
    data = common.setup(args, val_fraction=0.2)
    baseline = common.compress_run("none", common.build(args), data, args)
    result = common.compress_run("layer-folding", common.build(args), data, args, lam=args.lam,
                                 reference_accuracy=baseline.stages[-1].val_accuracy)
    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline.model, data, args, "baseline"),
            common.fold_and_measure("Layer Folding, exact", result.model, data, args, "layer_folding"),
            common.fold_and_measure("Layer Folding, fold-all", result.model, data, args, "layer_folding_all",
                                    fold_all=True)]
    common.finish(rows, data, args, f"Layer Folding on {args.arch}",
                  extra={"identities": result.removed, "stages": [vars(s) for s in result.stages]},
                  note=f"{len(result.removed)} activations made identities.\n\n{result.markdown()}")


if __name__ == "__main__":
    main()
