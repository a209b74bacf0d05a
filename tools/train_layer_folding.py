"""Layer Folding recipe (Ben Dror et al., arXiv 2106.09309) on the small MobileNetV2.

1. Train the plain network (the baseline).
2. Swap each ReLU for ``y = a*x + (1-a)*relu(x)`` (weights copied from the baseline, slopes at
   ``--slope-init``) and train with ``lambda * sum|1 - a^2|``, slopes clipped to [0, 1].
3. Snap slopes (>= ``--threshold`` -> 1, else 0), move each now-linear conv chain's padding onto
   its first conv, and fine-tune with the slopes frozen.
4. Export, fold with graphfold (exact default, then ``fold_all``), evaluate and time both against
   the folded baseline.

    python tools/train_layer_folding.py
"""
from __future__ import annotations

import _recipe_common as common

from graphfold.train import clip_slopes, folding_activations, relocate_padding, slope_regularizer, snap_slopes


def main() -> None:
    p = common.parser("layer_folding", __doc__.splitlines()[0], epochs=30, arch="mobilenetv2")
    p.add_argument("--fold-epochs", type=int, default=20, help="epochs with the slope regularizer")
    p.add_argument("--finetune-epochs", type=int, default=10, help="epochs after snapping")
    p.add_argument("--lam", type=float, default=1.0, help="slope regularizer weight (paper: 0.25)")
    p.add_argument("--slope-init", type=float, default=0.0, help="initial slope a (paper: 0)")
    p.add_argument("--threshold", type=float, default=0.9, help="snap slopes >= this to 1")
    p.add_argument("--fold-outer", action="store_true",
                   help="MobileNetV2: let the stem and head activations fold too (no conv merge comes of it)")
    args = p.parse_args()
    data = common.setup(args)

    baseline = common.train_baseline(data, args)
    outer = {} if args.fold_outer or args.arch != "mobilenetv2" else {"outer_activation": "relu"}
    model = common.build(args, activation="folding", **outer)
    # Same layers but for the slopes, which start at --slope-init (0 is the baseline's ReLU).
    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("slope") for name in missing)
    for _, act in folding_activations(model):
        act.slope.data.fill_(args.slope_init)
    common.train(model, data, args, epochs=args.fold_epochs, desc="layer folding",
                 penalty=lambda m: slope_regularizer(m, args.lam), after_step=lambda: clip_slopes(model))
    slopes = {name: [round(float(a), 4) for a in act.slope] for name, act in folding_activations(model)}
    modes = snap_slopes(model, args.threshold)
    chains = relocate_padding(model, data.x_train[:1])
    common.train(model, data, args, epochs=args.finetune_epochs, desc="fine-tune", lr=args.lr / 2)
    n_identity = sum(mode == "identity" for mode in modes.values())
    print(f"snapped {len(modes)} activations: {n_identity} identity; padding moved on {len(chains)} chains")

    rows = [common.fold_and_measure(f"{args.arch} plain (baseline)", baseline, data, args, "baseline"),
            common.fold_and_measure("Layer Folding, exact", model, data, args, "layer_folding"),
            common.fold_and_measure("Layer Folding, fold-all", model, data, args, "layer_folding_all",
                                    fold_all=True)]
    common.finish(rows, data, args, f"Layer Folding on {args.arch}",
                  extra={"slopes_before_snap": slopes, "modes": modes, "relocated_chains": chains},
                  note=f"{n_identity} of {len(modes)} activations snapped to the identity "
                       f"(threshold {args.threshold}); padding relocated on {len(chains)} linear chains.")


if __name__ == "__main__":
    main()
