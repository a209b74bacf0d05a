"""Network Implosion recipe (Ida & Fujiwara, arXiv 1906.03826) on ResNet-20, through graphfold.train.compress.

1. The plain ResNet-20 trained for ``--epochs`` (the baseline).
2. ``compress(method="implosion")`` on the same plain network, also ``--epochs`` in total: a
   learnable priority scale on every residual branch (L1 ``--lam``) for half of them, then the
   lowest-priority identity unit is erased and the network retrained, while validation accuracy
   (20% of the training images, never the test split) stays within ``--budget`` points of the
   baseline's.
3. Both exported with BatchNorm kept, folded by graphfold, evaluated on the test split, timed.

    python tools/train_implosion.py
"""
from __future__ import annotations

import _recipe_common as common


def main() -> None:
    p = common.parser("implosion", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    p.add_argument("--lam", type=float, default=1e-3, help="L1 weight on the priority scales")
    p.add_argument("--budget", type=float, default=0.5, help="validation accuracy a erasure may cost, points")
    args = p.parse_args()
    data = common.setup(args, val_fraction=0.2)
    baseline = common.compress_run("none", common.build(args), data, args)
    result = common.compress_run("implosion", common.build(args), data, args, lam=args.lam,
                                 reference_accuracy=baseline.stages[-1].val_accuracy)
    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline.model, data, args, "baseline"),
            common.fold_and_measure(f"Implosion, {len(result.removed)} units erased", result.model, data, args,
                                    "implosion")]
    common.finish(rows, data, args, f"Network Implosion on {args.arch}",
                  extra={"erased": result.removed, "stages": [vars(s) for s in result.stages]},
                  note=f"Erased: {', '.join(result.removed) or 'none'}.\n\n{result.markdown()}")


if __name__ == "__main__":
    main()
