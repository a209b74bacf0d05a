"""Learned folding (--refit) on the digits reference nets: test accuracy and latency, measured.

Trains the plain baselines once with the project's recipe (``tools/train_baseline.py``, cached in
runs/baseline/), writes the digits training split as calibration data (``cal.npz`` and
``labels.npy``: the run fits and decides on it, never on the test split), runs the graphfold CLI
with ``--refit`` on each network, and measures on the 450 test images: top-1 accuracy of the
exported baseline and of the result, agreement between them, and latency with ``graphfold.bench``
(onnxruntime CPU, 1 thread, ORT_ENABLE_ALL, batch 1, interleaved rounds; the ratio of per-process
CPU time per call, which a loaded machine disturbs least, then of the wall-clock median and min,
with the worst p90/p10 spread). Wall and CPU time of each graphfold run are reported as well.

    python tools/refit_benchmark.py                       # ResNet-20 and MobileNetV2, --max-accuracy-drop 0.5
    python tools/refit_benchmark.py --archs vgg --calibration-samples 256 -- --target-latency 0.7

Arguments after ``--`` go to graphfold unchanged (they replace the default ``--max-accuracy-drop 0.5``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graphfold.bench import bench  # noqa: E402

BASELINE = REPO / "runs" / "baseline"
OUT = REPO / "runs" / "refit"


def ensure_baselines(archs: list[str], seed: int) -> Path:
    """runs/baseline (seed 0, the recipe's default) or runs/baseline_seedN: trained once, then reused."""
    folder = BASELINE if seed == 0 else BASELINE.with_name(f"baseline_seed{seed}")
    missing = [a for a in archs if not (folder / f"{a}.onnx").exists()]
    if missing:
        print(f"training baselines {missing} with tools/train_baseline.py (once; cached in {folder})", flush=True)
        subprocess.run([sys.executable, str(REPO / "tools" / "train_baseline.py"), "--archs", *missing,
                        "--seed", str(seed), "--out", str(folder), "--no-progress", "--rounds", "5"], check=True)
    return folder


def write_data(samples: int | None, seed: int) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    from graphfold.train.data import load_digits_split

    data = load_digits_split(16)
    x, y = data.x_train.numpy(), data.y_train.numpy()
    tag = "all"
    if samples is not None and samples < len(y):
        pick = np.sort(np.random.default_rng(seed).choice(len(y), samples, replace=False))
        x, y, tag = x[pick], y[pick], str(samples)
    OUT.mkdir(parents=True, exist_ok=True)
    cal, labels = OUT / f"cal_{tag}.npz", OUT / f"labels_{tag}.npy"
    np.savez(cal, input=x)
    np.save(labels, y)
    return cal, labels, data.x_test.numpy(), data.y_test.numpy()


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)


def run_graphfold(base: Path, out: Path, report: Path, cal: Path, labels: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "graphfold", str(base), "-o", str(out), "--calibration", str(cal),
               "--labels", str(labels), *extra, "--report", str(report), "-q"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"graphfold failed ({result.returncode}): {result.stderr.strip()}")
    shown = " ".join(["graphfold", os.path.relpath(base, REPO), "-o", os.path.relpath(out, REPO),
                      "--calibration", os.path.relpath(cal, REPO), "--labels", os.path.relpath(labels, REPO),
                      *extra])
    return {"command": shown, "wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime)
            - (before.ru_utime + before.ru_stime)}


def time_one_fit(samples: int = 1010, channels: int = 64, side: int = 8) -> dict:
    """One region's fit as --refit runs it: 64 -> 64 channels, 3x3, on 1010 samples of 8x8 (the
    fit part of the digits training split at ResNet-20's widest stage, twice its spatial size)."""
    from graphfold.refit.fit import ConvFit
    from graphfold.refit.stage import FIT_FLOPS, MIN_ROWS_PER_FEATURE, _one_blas_thread

    rng = np.random.default_rng(0)
    features = channels * 9 + 1
    rows = max(FIT_FLOPS / features ** 2 / 2, MIN_ROWS_PER_FEATURE * features)
    batches = [(rng.normal(size=(64, channels, side, side)).astype(np.float32),
                rng.normal(size=(64, channels, side, side)).astype(np.float32)) for _ in range(0, samples, 64)]
    with _one_blas_thread():
        wall, cpu = time.perf_counter(), time.process_time()
        fit = ConvFit(channels, channels, (3, 3), (1, 1), (1, 1, 1, 1), max_rows=int(rows / len(batches)) + 1)
        for x, y in batches:
            fit.add(x, y)
        fit.solve()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "rows": fit.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet20", "mobilenetv2"],
                        choices=["resnet20", "mobilenetv2", "vgg"])
    parser.add_argument("--calibration-samples", type=int, help="a seeded subset of the training split")
    parser.add_argument("--seed", type=int, default=0, help="of the calibration subset")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of the baseline training (default 0)")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds (default 30)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--naive", action="store_true",
                        help="no --refit: the control, e.g. -- --drop-branches 6 --tolerance 1e9 erases the 6 least "
                             "important branches with no compensation")
    parser.add_argument("graphfold_args", nargs="*", help="after --: graphfold options")
    args = parser.parse_args()
    extra = args.graphfold_args or ["--max-accuracy-drop", "0.5"]
    if not args.naive:
        extra = ["--refit", *extra]
    folder = ensure_baselines(args.archs, args.train_seed)
    cal, labels, x_test, y_test = write_data(args.calibration_samples, args.seed)
    rows = []
    for arch in args.archs:
        base = folder / f"{arch}.onnx"
        stem = f"{arch}{'' if args.train_seed == 0 else f'_seed{args.train_seed}'}{args.tag}"
        out, report_path = OUT / f"{stem}.refit.onnx", OUT / f"{stem}.report.json"
        print(f"{arch}: graphfold {' '.join(extra)}", flush=True)
        run = run_graphfold(base, out, report_path, cal, labels, extra)
        report = json.loads(report_path.read_text())
        exact = OUT / f"{stem}.exact.onnx"  # the exact fold: what the latency of a plain graphfold run is
        subprocess.run([sys.executable, "-m", "graphfold", str(base), "-o", str(exact), "-q"], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        timing = bench([str(base), str(exact), str(out)], threads=1, batch=1, opt_level="all",
                       rounds=args.rounds, warmup=10, repeat=20)
        base_pred, out_pred = predict(base, x_test), predict(out, x_test)
        refit = report.get("refit") or {"fit_samples": 0, "holdout_samples": int(np.load(cal)["input"].shape[0]),
                                        "candidates": [{"kind": r["pass_name"], "status": "accepted"}
                                                       for r in report["rewrites"] if not r["exact"]],
                                        "before": {"holdout": {"accuracy": math.nan}},
                                        "after": {"holdout": {"accuracy": math.nan, "agreement": math.nan}},
                                        "estimated_cost_ratio": math.nan, "fit_seconds": 0.0}
        rows.append({
            "arch": arch, **run,
            "calibration_samples": refit["fit_samples"] + refit["holdout_samples"],
            "accepted": [c["kind"] for c in refit["candidates"] if c["status"] == "accepted"],
            "convs": [report["before"]["convs"], report["after"]["convs"]],
            "test_acc_base": float((base_pred == y_test).mean()), "test_acc_refit": float((out_pred == y_test).mean()),
            "test_agreement": float((base_pred == out_pred).mean()),
            "holdout_acc": [refit["before"]["holdout"]["accuracy"], refit["after"]["holdout"]["accuracy"]],
            "holdout_agreement": refit["after"]["holdout"]["agreement"],
            "latency_ms": {t.path: {"median": t.median_ms, "min": t.min_ms, "p10": t.p10_ms, "p90": t.p90_ms,
                                    "cpu": t.cpu_ms} for t in timing.timings},
            "latency_ratio": timing.timings[2].ratio,
            "latency_ratio_min": timing.timings[2].min_ms / timing.timings[0].min_ms,
            "latency_cpu_ratio": timing.timings[2].cpu_ratio,
            "latency_spread": max(t.spread for t in timing.timings),
            "latency_ratio_vs_exact": timing.timings[2].cpu_ratio / timing.timings[1].cpu_ratio,
            "estimated_cost_ratio": refit["estimated_cost_ratio"], "fit_s": refit["fit_seconds"],
        })
    print("\n| net | calibration | rewrites kept | convs | test acc base -> refit | test agreement "
          "| holdout acc | latency: CPU, median, min (spread) | graphfold wall / CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{r['accepted'].count(k)} {k.split('-', 1)[1]}" for k in sorted(set(r["accepted"])))
        print(f"| {r['arch']} | {r['calibration_samples']} | {kinds or 'none'} | {r['convs'][0]} -> {r['convs'][1]} "
              f"| {100 * r['test_acc_base']:.2f}% -> {100 * r['test_acc_refit']:.2f}% "
              f"({100 * (r['test_acc_refit'] - r['test_acc_base']):+.2f}) | {100 * r['test_agreement']:.2f}% "
              f"| {100 * r['holdout_acc'][0]:.2f}% -> {100 * r['holdout_acc'][1]:.2f}% "
              f"| {r['latency_cpu_ratio']:.2f}x, {r['latency_ratio']:.2f}x, {r['latency_ratio_min']:.2f}x "
              f"({r['latency_spread']:.2f}) | {r['wall_s']:.0f} / {r['cpu_s']:.0f} |")
    for r in rows:
        print(f"  {r['command']}")
    one = time_one_fit()
    print(f"one fit, 64 -> 64 channels 3x3, 1010 samples of 8x8 ({one['rows']} patch rows sampled): "
          f"{one['wall_s']:.2f} s wall, {one['cpu_s']:.2f} s CPU")
    seed = "" if args.train_seed == 0 else f"_seed{args.train_seed}"
    (OUT / f"results{seed}{args.tag}.json").write_text(json.dumps({"rows": rows, "one_fit": one}, indent=2))


if __name__ == "__main__":
    main()
