"""Network Implosion recipe (Ida & Fujiwara, arXiv 1906.03826) on ResNet-20.

1. Train the plain ResNet-20 (the baseline) on the training part of the split; 20% of the
   original training set is held out for validation, which alone drives the erasure decisions.
2. Train ResNet-20 with a learnable priority scale on every residual branch (init 1, L1 ``--lam``).
3. Implode: erase the identity-shortcut unit of lowest |scale|, retrain ``--retrain-epochs``,
   and stop at the first erasure whose validation accuracy falls more than ``--margin`` points
   below the trained network's; keep the last accepted network.
4. Export, fold with graphfold, evaluate and time against the folded baseline. For comparison,
   the trained network also goes through graphfold's approximate ``drop_branches`` option
   (as many branches as the loop erased, ranked by the learned scales; no retraining).

    python tools/train_implosion.py
"""
from __future__ import annotations

import _recipe_common as common

from graphfold.train import evaluate, implode, priority_l1, unit_priorities


def main() -> None:
    p = common.parser("implosion", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    p.add_argument("--lam", type=float, default=1e-3, help="L1 weight on the priority scales")
    p.add_argument("--margin", type=float, default=0.5, help="accepted validation accuracy loss, points")
    p.add_argument("--retrain-epochs", type=int, default=3, help="epochs after each erasure")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="graphfold's output error budget for the approximate row (max|dy| / max|y|)")
    args = p.parse_args()
    data = common.setup(args, val_fraction=0.2)

    baseline = common.train_baseline(data, args)
    model = common.build(args, unit="implosion")
    common.train(model, data, args, desc="implosion", penalty=lambda m: priority_l1(m, args.lam))
    priorities = unit_priorities(model)

    def retrain(candidate) -> None:
        common.train(candidate, data, args, epochs=args.retrain_epochs, desc="retrain", lr=args.lr / 5,
                     penalty=lambda m: priority_l1(m, args.lam))

    result = implode(model, retrain, lambda m: evaluate(m, data.x_val, data.y_val), args.margin)
    for step in result.steps:
        print(f"erase {step.unit:10} priority {step.priority:.4f} -> val {step.accuracy:.2f}% "
              f"({'kept' if step.accepted else 'rejected, stop'})")

    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline, data, args, "baseline"),
            common.fold_and_measure("Implosion, trained", model, data, args, "implosion_trained"),
            common.fold_and_measure(f"Implosion, {len(result.erased)} units erased", result.model, data, args,
                                    "implosion")]
    if result.erased:
        rows.append(common.fold_and_measure(
            f"Implosion trained, graphfold drop_branches={len(result.erased)} (approx.)", model, data, args,
            "implosion_approx", drop_branches=len(result.erased), tolerance=args.tolerance))
    steps = "; ".join(f"{s.unit} ({s.priority:.3f}) -> {s.accuracy:.2f}%{'' if s.accepted else ' rejected'}"
                      for s in result.steps)
    common.finish(rows, data, args, f"Network Implosion on {args.arch}",
                  extra={"priorities": priorities, "baseline_val_accuracy": result.baseline_accuracy,
                         "steps": [vars(s) for s in result.steps], "erased": result.erased},
                  note=f"Validation accuracy of the trained network {result.baseline_accuracy:.2f}% "
                       f"(margin {args.margin} points). Erasures (priority -> validation accuracy): {steps}.")


if __name__ == "__main__":
    main()
