"""epsilon-ResNet recipe (Yu et al., arXiv 1804.01661) on ResNet-20, through graphfold.train.compress.

1. The plain ResNet-20 trained for ``--epochs`` (the baseline).
2. ``compress(method="epsilon")`` on the same plain network, also ``--epochs`` in total: a
   strict-identity gate on every residual branch (eps 0 for the first 20% of the steps, then
   ``--eps``) and an L1 on each branch's last BatchNorm scale (``--lam``) for 80% of them; units
   whose branch stays within eps on the training images are erased, the other gates dropped,
   and the rest of the epochs fine-tune.
3. Both exported with BatchNorm kept, folded by graphfold, evaluated on the test split, timed.

    python tools/train_eps_resnet.py
"""
from __future__ import annotations

import _recipe_common as common


def main() -> None:
    p = common.parser("eps_resnet", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    p.add_argument("--eps", type=float, default=2.5, help="gate threshold (paper: 2.5 on CIFAR)")
    p.add_argument("--lam", type=float, default=5e-3, help="L1 weight on the last BN scale of gated branches")
    args = p.parse_args()
    data = common.setup(args, val_fraction=0.2)
    baseline = common.compress_run("none", common.build(args), data, args)
    result = common.compress_run("epsilon", common.build(args), data, args, lam=args.lam, eps=args.eps)
    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline.model, data, args, "baseline"),
            common.fold_and_measure(f"epsilon-ResNet, {len(result.removed)} units off", result.model, data, args,
                                    "eps_resnet")]
    common.finish(rows, data, args, f"epsilon-ResNet on {args.arch}",
                  extra={"erased": result.removed, "stages": [vars(s) for s in result.stages]},
                  note=f"Erased units: {', '.join(result.removed) or 'none'}.\n\n{result.markdown()}")


if __name__ == "__main__":
    main()
