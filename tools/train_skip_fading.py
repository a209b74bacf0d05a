"""Skip fading recipe (Joyce & Verschelde, arXiv 2408.07815) on ResNet-20, through graphfold.train.compress.

1. The plain ResNet-20 trained for ``--epochs`` (the baseline).
2. ``compress(method="fade")`` on the same plain network, also ``--epochs``: every shortcut is
   scaled by a weight that a cosine schedule takes from 1 to 0 between 10% and 70% of training;
   the rest fits the network without skips.
3. Both exported (no skip Add left; the projection shortcuts' 1x1 convs are gone too), folded
   by graphfold, evaluated on the test split, timed.

    python tools/train_skip_fading.py
"""
from __future__ import annotations

import _recipe_common as common

from graphfold.train import skip_free


def main() -> None:
    p = common.parser("skip_fading", __doc__.splitlines()[0], epochs=30, arch="resnet20")
    args = p.parse_args()
    data = common.setup(args, val_fraction=0.2)
    baseline = common.compress_run("none", common.build(args), data, args)
    result = common.compress_run("fade", common.build(args), data, args)
    if not skip_free(result.model):
        raise SystemExit("train_skip_fading: the schedule did not reach 0 before training ended")
    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline.model, data, args, "baseline"),
            common.fold_and_measure("skip fading, no skips left", result.model, data, args, "skip_fading")]
    common.finish(rows, data, args, f"Skip fading on {args.arch}", note=result.markdown())


if __name__ == "__main__":
    main()
