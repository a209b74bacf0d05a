"""Evaluate every method against its controls on the rendered-fonts task, over several seeds.

The network is a user-style CIFAR ResNet (tools/_plain_nets.py, torchvision coding style), given
to ``graphfold.train.compress`` as is; every run trains for the same total number of epochs.
Per seed:

* ``full``: the plain network (the baseline); ``shallow``: the same family with every
  shape-keeping unit removed, trained from scratch (does depth matter on this task at all?);
* each method (Layer Folding, Network Implosion, epsilon-ResNet, skip fading), choosing on the
  validation split only; every budget is measured against the baseline's validation accuracy of
  the same seed; Layer Folding's lambda is chosen from a small grid (``--lf-lams``) on the
  validation split: the most activations made identities within the budget, else the best accuracy;
* its controls: the same schedule with the same number of units (activations for Layer Folding)
  chosen at random, and the architecture the method ended with, trained from scratch.

Test accuracy is measured once, at the end, on the folded ONNX model under onnxruntime; depth is
the number of Conv/Gemm nodes on the longest path of graphfold's folded export.

    python tools/train_evaluate.py                 # 3 seeds, 2 processes; results in runs/evaluate
    python tools/train_evaluate.py --write-doc     # ... and its section in docs/training.md
    python tools/train_evaluate.py --report-only --write-doc   # rebuild the report from runs/evaluate
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from _plain_nets import PlainResNet  # noqa: E402
from graphfold.train.compress import CompressResult, TrainOptions, compress, snap_to  # noqa: E402
from graphfold.train.convert import make_foldable  # noqa: E402
from graphfold.train.fonts import CLASSES, FACES, load_fonts_split  # noqa: E402
from graphfold.train.loop import evaluate  # noqa: E402
from graphfold.train.padding import relocate_padding  # noqa: E402

METHODS = ("implosion", "epsilon", "layer-folding", "fade")
PAPERS = {
    "implosion": "Network Implosion reports 24.00-42.86% fewer layers with no accuracy drop (CIFAR-10/100, ImageNet)",
    "epsilon": "epsilon-ResNet reports up to ~80% fewer parameters with marginal accuracy loss (CIFAR, SVHN, ImageNet)",
    "layer-folding": "Layer Folding reports removing a large share of the activations of CIFAR ResNets, "
                     "MobileNetV2 and EfficientNet-Lite with small accuracy loss after fine-tuning",
    "fade": "the algebraic-collapse paper reports ResNet-34 on MNIST predicting 22-46% faster at equal accuracy "
            "once the skips are faded out",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=6, help="total training epochs of every run (default 6)")
    p.add_argument("--depth", type=int, default=14, help="ResNet depth 6n+2 (default 14)")
    p.add_argument("--width", type=int, default=12, help="first stage's width (default 12)")
    p.add_argument("--size", type=int, default=16, help="image side (default 16)")
    p.add_argument("--train", type=int, default=6800, help="training images (default 6800)")
    p.add_argument("--val", type=int, default=1700, help="validation images (default 1700)")
    p.add_argument("--test", type=int, default=3400, help="test images (default 3400)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="validation accuracy a method may give up below the baseline's (same seed), points")
    p.add_argument("--lf-lams", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="Layer Folding's lambdas; the one chosen on validation is reported (default 0.25 0.5 1.0)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "evaluate")
    p.add_argument("--write-doc", action="store_true", help="rewrite this run's section of docs/training.md")
    p.add_argument("--section", default="main",
                   help="name of the docs/training.md section this run writes (default main)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild the report from the results already in --out")
    p.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)
    return p


# ---- one seed ----------------------------------------------------------------------------------

def _onnx_accuracy(result: CompressResult, x: torch.Tensor, y: torch.Tensor) -> float:
    session = ort.InferenceSession(result.onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x.numpy()})[0]
    return 100.0 * float((logits.argmax(1) == y.numpy()).mean())


def _unit_index(name: str) -> int | None:
    match = re.fullmatch(r"units\.(\d+)\.residual", name)
    return int(match.group(1)) if match else None


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    data = load_fonts_split(args.size, args.train, args.val, args.test)
    train, val = (data.x_train, data.y_train), (data.x_val, data.y_val)
    options = TrainOptions(lr=args.lr, seed=seed)
    n_units = 3 * ((args.depth - 2) // 6)
    droppable = PlainResNet.droppable(args.depth)

    def fresh(**kwargs) -> PlainResNet:
        torch.manual_seed(seed)
        return PlainResNet(args.depth, args.width, len(CLASSES), **kwargs)

    results: dict[str, dict] = {}

    def run(key: str, model: torch.nn.Module, method: str, removed: int | None = None, **kwargs) -> CompressResult:
        started = time.process_time()
        if method != "none":  # every budget against the baseline of this seed, not the method's own network
            kwargs["reference_accuracy"] = results["full"]["val"]
        # fold_all: depth counts what graphfold can merge exactly, whether or not it pays on this CPU
        result = compress(model, train, val, method, args.epochs, args.budget, options=options,
                          fold_options={"fold_all": True}, **kwargs)
        results[key] = {
            "method": method, "removed": result.removed,
            "n_removed": len(result.removed) if removed is None else removed,
            "depth": result.depth, "convs": result.report.after["convs"],
            "test_onnx": _onnx_accuracy(result, data.x_test, data.y_test),
            "test_torch": evaluate(result.model, data.x_test, data.y_test),
            "val": result.stages[-1].val_accuracy, "stages": [asdict(s) for s in result.stages],
            "cpu_s": time.process_time() - started,
            # the budget's reference when given (None: the method's own first phase)
            "reference": kwargs.get("reference_accuracy"), "within_budget": result.within_budget,
        }
        logging.info("seed %d %s: %s", seed, key, {k: results[key][k] for k in ("depth", "n_removed", "test_onnx")})
        return result

    scratch: dict[tuple, str] = {}

    def from_scratch(key: str, keep: list[bool]) -> None:
        if tuple(keep) in scratch:  # the same architecture was trained already in this seed
            results[key] = dict(results[scratch[tuple(keep)]])
            return
        scratch[tuple(keep)] = key
        run(key, fresh(keep=keep), "none", removed=keep.count(False))

    def choose_lambda() -> tuple[CompressResult, float]:
        """Layer Folding with each of ``--lf-lams``; keep the one the validation split prefers.

        Preferred: within the budget of the baseline's validation accuracy after fine-tuning, the
        most activations made identities (ties: the higher accuracy); when no lambda is within
        the budget, the highest accuracy. The test split plays no part in the choice.
        """
        floor = results["full"]["val"] - args.budget
        tried = {lam: run(f"layer-folding/lam={lam:g}", fresh(), "layer-folding", lam=lam) for lam in args.lf_lams}

        def preference(lam: float) -> tuple:
            final = tried[lam].stages[-1].val_accuracy
            return (final >= floor, len(tried[lam].removed) if final >= floor else 0, final)

        lam = max(args.lf_lams, key=preference)
        results["layer-folding"] = {**results[f"layer-folding/lam={lam:g}"], "lam": lam, "cpu_s": 0.0}
        return tried[lam], lam

    run("full", fresh(), "none")
    from_scratch("shallow", [i not in droppable for i in range(n_units)])
    example = data.x_train[:2]
    for method in args.methods:
        if method == "layer-folding":
            result, lam = choose_lambda()
            run_kwargs = {"lam": lam}
        else:
            result, run_kwargs = run(method, fresh(), method), {}
        k = len(result.removed)
        if method == "fade":
            run(f"{method}/scratch", fresh(skips=False), "none", removed=k)
            continue
        if k == 0:
            continue
        run(f"{method}/random", fresh(), method, random_erasures=k, **run_kwargs)
        if method == "layer-folding":
            work = make_foldable(fresh(), example)
            snap_to(work, result.removed)
            relocate_padding(work, example)
            run(f"{method}/scratch", work, "none", removed=k)
            continue
        erased = {_unit_index(name) for name in result.removed}
        if erased <= set(droppable):
            from_scratch(f"{method}/scratch", [i not in erased for i in range(n_units)])
    return {"seed": seed, "results": results}


# ---- report ------------------------------------------------------------------------------------

def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (lscpu unavailable)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _row(label: str, key: str, seeds: list[dict]) -> str:
    runs = [s["results"][key] for s in seeds if key in s["results"]]
    if not runs:
        return f"| {label} | - | - | - | - | not run (nothing was removed) |"
    depths = sorted({r["depth"] for r in runs})
    removed = sorted({r["n_removed"] for r in runs})
    return (f"| {label} | {'/'.join(map(str, depths))} | {'/'.join(map(str, removed))} | "
            f"{_mean_std([r['val'] for r in runs])} | {_mean_std([r['test_onnx'] for r in runs])} | "
            f"{len(runs)} |")


LABELS = {"implosion": "Network Implosion", "epsilon": "epsilon-ResNet", "layer-folding": "Layer Folding",
          "fade": "skip fading"}


def _reference(result: dict) -> str:
    reference = result.get("reference")
    if reference is None:
        return "the method's own network after its first phase"
    return f"the baseline's {reference:.2f}% validation accuracy"


def report(seeds: list[dict], args: argparse.Namespace, command: str, wall: float) -> str:
    cpu_total = sum(r["cpu_s"] for s in seeds for r in s["results"].values())
    head = ["| network | depth | removed | val acc % | test acc % (folded ONNX) | seeds |", "|---|---|---|---|---|---|"]
    lines = [
        f"`{command}`", "",
        f"Task: rendered fonts, {len(CLASSES)} classes, {len(FACES)} faces, {args.size}x{args.size}; "
        f"{args.train} / {args.val} / {args.test} train / validation / test images. Network: ResNet-{args.depth} "
        f"(width {args.width}, torchvision-style code in `tools/_plain_nets.py`). Every run trains "
        f"{args.epochs} epochs in total; budget {args.budget} validation points below the baseline of the same seed; seeds "
        f"{', '.join(str(s['seed']) for s in seeds)}; mean ± standard deviation over seeds.",
        f"Depth: Conv/Gemm nodes on the longest path of graphfold's folded export; removed: units "
        f"erased, activations made identities or skips faded (several values: they differ by seed).",
        f"Ran on {_cpu()}, torch {torch.__version__} with 1 thread per process, {args.jobs} processes; "
        f"wall time {wall / 60:.1f} min, CPU time {cpu_total / 60:.1f} min. Accuracies and timings differ "
        "across CPUs (float reductions and thread scheduling change the training trajectory).", "",
        "Does depth matter here?", "", *head,
        _row(f"full ResNet-{args.depth}", "full", seeds),
        _row("shallow: every shape-keeping unit removed, from scratch", "shallow", seeds), "",
    ]
    for method in args.methods:
        lines += [f"**{LABELS[method]}** ({PAPERS[method]}).", "", *head,
                  _row(f"full ResNet-{args.depth} (baseline)", "full", seeds),
                  _row(LABELS[method], method, seeds)]
        if method == "fade":
            lines.append(_row("control: the same network without skips, from scratch", f"{method}/scratch", seeds))
        else:
            lines += [_row("control: as many chosen at random", f"{method}/random", seeds),
                      _row("control: the method's final architecture, from scratch", f"{method}/scratch", seeds)]
        lines.append("")
        if method == "implosion":
            lines += ["Accuracy against depth along the erasures (validation accuracy after each retraining):", ""]
            for s in seeds:
                stages = s["results"].get(method, {}).get("stages", [])
                steps = [f"trained {stages[0]['val_accuracy']:.2f}%"] if stages else []
                steps += [f"{st['stage'][len('erase '):]} {st['val_accuracy']:.2f}%" for st in stages
                          if st["stage"].startswith("erase")]
                lines.append(f"- seed {s['seed']}: {'; '.join(steps) or 'no erasure tried'} "
                             f"(budget {args.budget} points below {_reference(s['results'].get(method, {}))})")
            lines.append("")
        if method == "layer-folding":
            lines += ["lambda chosen on the validation split (validation accuracy after the regularized first "
                      "phase, activations made identities, validation accuracy after fine-tuning; the chosen "
                      "lambda in bold):", ""]
            for s in seeds:
                chosen = s["results"].get(method, {}).get("lam")
                tried = [(key.split("=", 1)[1], r) for key, r in s["results"].items()
                         if key.startswith(f"{method}/lam=")]
                text = [("**{}**" if chosen is not None and float(lam) == chosen else "{}").format(
                    f"lambda {lam}: {r['stages'][0]['val_accuracy']:.2f}%, {r['n_removed']} identities"
                    + ("" if r.get("within_budget", True) else " (budget missed)") + f", {r['val']:.2f}%")
                    for lam, r in tried]
                lines.append(f"- seed {s['seed']}: {'; '.join(text) or 'lambda not chosen (older run)'} "
                             f"(budget {args.budget} points below {_reference(s['results'].get(method, {}))})")
            lines.append("")
    return "\n".join(lines)


def write_doc(text: str, name: str) -> None:
    """Replace this run's marked section of docs/training.md (append it when it is new)."""
    begin, end = f"<!-- evaluation-{name}:begin -->", f"<!-- evaluation-{name}:end -->"
    doc = REPO / "docs" / "training.md"
    current = doc.read_text()
    section = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        current = current[:current.index(begin)] + section + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    doc.write_text(current)


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one_seed is not None:
        result = run_seed(args.one_seed, args)
        (args.out / f"seed{args.one_seed}.json").write_text(json.dumps(result, indent=1))
        return
    if args.report_only:
        meta = json.loads((args.out / "run.json").read_text())
        args.jobs = meta.get("jobs", args.jobs)
        finish(args, meta["command"], meta["wall_s"])
        return
    started = time.time()
    forwarded = sys.argv[1:]  # a seed's process ignores --write-doc and --section
    pending, running = list(args.seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, *forwarded, "--one-seed", str(seed)]))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                sys.exit(f"train_evaluate: a seed's run failed (exit {proc.returncode})")
    command = ("python tools/train_evaluate.py " + " ".join(forwarded)).strip()
    wall = time.time() - started
    (args.out / "run.json").write_text(json.dumps({"command": command, "wall_s": wall, "jobs": args.jobs}))
    finish(args, command, wall)


def finish(args: argparse.Namespace, command: str, wall: float) -> None:
    seeds = [json.loads((args.out / f"seed{seed}.json").read_text()) for seed in args.seeds]
    text = report(seeds, args, command, wall)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    if args.write_doc:
        write_doc(text, args.section)


if __name__ == "__main__":
    main()
