"""Fold each reference network and measure what it gains under onnxruntime.

For every network in models/fold_reference.py: export it (BatchNorm kept), run graphfold's
default pipeline (and, with --fold-all, every exact merge), and print nodes, convs, depth,
MACs before and after with the latency ratio folded/original, measured interleaved in one
run (onnxruntime CPU, full optimization on both sides, 1 thread by default, 1x3x224x224).

    python tools/fold_benchmark.py [--threads 1] [--rounds 30] [--only repvgg,...] [--markdown docs/fold_benchmark.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnx  # noqa: E402

import graphfold  # noqa: E402
from graphfold.bench import bench  # noqa: E402
from models import fold_reference  # noqa: E402


def run(names: list[str], threads: int, rounds: int, fold_all: bool, image: int) -> list[dict]:
    rows = []
    shapes = {"input": [1, 3, image, image]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.onnx")
            fold_reference.export(name, path, image=image)
            folded, report = graphfold.fold(path, input_shapes=shapes, fold_all=fold_all)
            out = os.path.join(tmp, f"{name}.folded.onnx")
            onnx.save(folded, out)
            timing = bench([path, out], threads=threads, rounds=rounds, input_shapes=shapes)
            rows.append({"model": name, "before": report.before, "after": report.after,
                         "max_rel": report.validation.max_rel, "rewrites": dict(report.counts()),
                         "ms": (timing.timings[0].median_ms, timing.timings[1].median_ms),
                         "ratio": timing.timings[1].ratio})
            print(_row(rows[-1]), flush=True)
    return rows


HEADER = ("| model | nodes | convs | depth | MACs (M) | max rel err | ms original | ms folded | latency ratio |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    b, a = r["before"], r["after"]
    macs = f"{b['macs'] / 1e6:.0f} -> {a['macs'] / 1e6:.0f}" if b["macs"] and a["macs"] else "?"
    return (f"| {r['model']} | {b['nodes']} -> {a['nodes']} | {b['convs']} -> {a['convs']} | "
            f"{b['depth']} -> {a['depth']} | {macs} | {r['max_rel']:.1e} | {r['ms'][0]:.2f} | {r['ms'][1]:.2f} | "
            f"{r['ratio']:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated subset of " + ", ".join(fold_reference.BUILDERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--fold-all", action="store_true", help="every exact merge, ignoring the cost model")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(fold_reference.BUILDERS)
    print(HEADER)
    rows = run(names, args.threads, args.rounds, args.fold_all, args.image)
    if args.markdown:
        command = "python tools/fold_benchmark.py " + " ".join(sys.argv[1:])
        with open(args.markdown, "w") as handle:
            handle.write(f"# graphfold on the reference networks\n\nMeasured with `{command}` "
                         f"(onnxruntime CPU, ORT_ENABLE_ALL on both sides, {args.threads} thread(s), "
                         f"1x3x{args.image}x{args.image}, {args.rounds} interleaved rounds, median).\n\n")
            handle.write(HEADER + "\n" + "\n".join(_row(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
