"""Skip fading recipe (Joyce & Verschelde, arXiv 2408.07815) on ResNet-20.

1. Train the plain ResNet-20 (the baseline).
2. Train ResNet-20 whose every shortcut is scaled by a weight that a cosine schedule takes from
   1 to 0 between ``--fade-start`` and ``--fade-end`` (fractions of training); the rest of
   training fits the network without skips.
3. Export (no skip Add left; the projection shortcuts' 1x1 convs are gone too), fold with
   graphfold, evaluate and time against the folded baseline.

    python tools/train_skip_fading.py
"""
from __future__ import annotations

import _recipe_common as common

from graphfold.train import SkipFadeScheduler, SkipWeight, skip_free


def main() -> None:
    p = common.parser("skip_fading", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    p.add_argument("--fade-start", type=float, default=0.1, help="fraction of training where fading starts")
    p.add_argument("--fade-end", type=float, default=0.6, help="fraction of training where skips reach 0")
    args = p.parse_args()
    data = common.setup(args)

    baseline = common.train_baseline(data, args)
    model = common.build(args, unit="fade")
    weights = [m for m in model.modules() if isinstance(m, SkipWeight)]
    steps = args.epochs * common.steps_per_epoch(data)
    scheduler = SkipFadeScheduler(weights, steps, args.fade_start, args.fade_end)
    common.train(model, data, args, desc="skip fading", after_step=scheduler.step)
    assert skip_free(model), "the schedule must reach 0 before training ends"

    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline, data, args, "baseline"),
            common.fold_and_measure("skip fading, no skips left", model, data, args, "skip_fading")]
    common.finish(rows, data, args, f"Skip fading on {args.arch}",
                  note=f"{len(weights)} skip connections faded from 1 to 0 between {args.fade_start:.0%} "
                       f"and {args.fade_end:.0%} of training (cosine).")


if __name__ == "__main__":
    main()
