"""epsilon-ResNet recipe (Yu et al., arXiv 1804.01661) on ResNet-20.

1. Train the plain ResNet-20 (the baseline).
2. Train ResNet-20 with a strict-identity gate on every residual branch: eps is 0 for the first
   ``--warmup`` fraction of the steps, then ``--eps``; an L1 on each branch's last BatchNorm scale
   (``--lam``) pushes branches under eps. A unit whose gate closes gets no task gradient again.
3. Deploy: units whose branch stays within eps on the whole training set are erased (plain
   identities in the export), the other gates are dropped; optionally fine-tune.
4. Export, fold with graphfold, evaluate and time against the folded baseline.

graphfold's own approximate ``epsilon`` option is no substitute here: it would have to judge
the branches of the gate-free network, where the units that training gated off are back and
change every later branch's input (on digits that network scores far below the gated one).

    python tools/train_eps_resnet.py
"""
from __future__ import annotations

import itertools

import _recipe_common as common

from graphfold.train import deploy_epsilon_resnet, evaluate, gate_sparsity_loss, set_epsilon


def main() -> None:
    p = common.parser("eps_resnet", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    p.add_argument("--eps", type=float, default=2.5, help="gate threshold (paper: 2.5 on CIFAR)")
    p.add_argument("--lam", type=float, default=5e-3, help="L1 weight on the last BN scale of gated branches")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps with eps = 0")
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs after deployment")
    args = p.parse_args()
    data = common.setup(args)

    baseline = common.train_baseline(data, args)
    model = common.build(args, unit="epsilon", eps=args.eps)
    set_epsilon(model, 0.0)
    warmup_steps = int(args.warmup * args.epochs * common.steps_per_epoch(data))
    steps = itertools.count(1)

    def after_step() -> None:
        if next(steps) == warmup_steps:
            set_epsilon(model, args.eps)

    common.train(model, data, args, desc="epsilon-ResNet",
                 penalty=lambda m: gate_sparsity_loss(m, args.lam), after_step=after_step)
    gated_accuracy = evaluate(model, data.x_test, data.y_test)
    calibration = data.x_train.split(256)
    erased = deploy_epsilon_resnet(model, calibration)
    deployed_accuracy = evaluate(model, data.x_test, data.y_test)
    if args.finetune_epochs:
        common.train(model, data, args, epochs=args.finetune_epochs, desc="fine-tune", lr=args.lr / 5)
    print(f"erased {len(erased)} units: {erased}; test accuracy gated {gated_accuracy:.2f}%, "
          f"deployed {deployed_accuracy:.2f}%, after fine-tuning {evaluate(model, data.x_test, data.y_test):.2f}%")

    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline, data, args, "baseline"),
            common.fold_and_measure(f"epsilon-ResNet, {len(erased)} units off", model, data, args, "eps_resnet")]
    common.finish(rows, data, args, f"epsilon-ResNet on {args.arch}",
                  extra={"erased": erased, "gated_accuracy": gated_accuracy,
                         "deployed_accuracy_before_finetune": deployed_accuracy},
                  note=f"Erased units: {', '.join(erased) or 'none'}. Test accuracy of the gated model "
                       f"{gated_accuracy:.2f}%, deployed before fine-tuning {deployed_accuracy:.2f}%.")


if __name__ == "__main__":
    main()
