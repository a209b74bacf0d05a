"""What the training recipes share: arguments, data, the baseline, fold-and-measure, the table.

Every recipe trains on scikit-learn's digits (fixed split, see graphfold.train.data), exports
each network with BatchNorm kept, runs ``graphfold.fold`` on it, evaluates the folded model with
onnxruntime on the held-out test set, and times all folded models against the folded plain
baseline with ``graphfold.bench`` (1 thread, ORT_ENABLE_ALL, interleaved rounds, median).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the recipes run as scripts; models/ lives at the repository root
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import graphfold  # noqa: E402
from graphfold.bench import bench  # noqa: E402
from graphfold.io import save_model  # noqa: E402
from graphfold.train import DigitsSplit, evaluate, export_onnx, fit, load_digits_split  # noqa: E402
from graphfold.train.compress import CompressResult, TrainOptions, compress  # noqa: E402
from models.mobilenetv2 import mobilenetv2_small  # noqa: E402
from models.resnet_cifar import resnet20, resnet56  # noqa: E402
from models.vgg import vgg_small  # noqa: E402

ARCHS = {"resnet20": resnet20, "resnet56": resnet56, "mobilenetv2": mobilenetv2_small, "vgg": vgg_small}


def parser(name: str, description: str, epochs: int, arch: str | None) -> argparse.ArgumentParser:
    """The arguments every recipe takes; recipes add their own method's knobs."""
    p = argparse.ArgumentParser(description=description)
    if arch is not None:
        p.add_argument("--arch", default=arch, choices=sorted(ARCHS), help=f"network (default {arch})")
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--size", type=int, default=16, help="input side after upsampling the 8x8 digits")
    p.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine a second OpenMP thread often spins instead of working.
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    p.add_argument("--rounds", type=int, default=30, help="latency rounds (default 30)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / name, help=f"output folder (default runs/{name})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N training images and N/2 validation and test images (smoke tests)")
    return p


def setup(args: argparse.Namespace, val_fraction: float = 0.0) -> DigitsSplit:
    """Seeds, threads, logging and the output folder; returns the data."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.started = (time.time(), time.process_time())
    data = load_digits_split(args.size, val_fraction)
    if args.subset:
        n, m = args.subset, max(1, args.subset // 2)
        data = DigitsSplit(data.x_train[:n], data.y_train[:n], data.x_val[:m], data.y_val[:m],
                           data.x_test[:m], data.y_test[:m])
    return data


def build(args: argparse.Namespace, **kwargs) -> nn.Module:
    """The recipe's network with a seed-determined initialisation."""
    torch.manual_seed(args.seed)
    return ARCHS[args.arch](**kwargs)


BATCH = 64


def steps_per_epoch(data: DigitsSplit) -> int:
    return -(-len(data.x_train) // BATCH)


def train(model: nn.Module, data: DigitsSplit, args: argparse.Namespace, epochs: int | None = None,
          desc: str = "train", **kwargs) -> None:
    """Train on the training split with the recipe's learning rate, seed and progress setting."""
    kwargs.setdefault("lr", args.lr)
    fit(model, data.x_train, data.y_train, args.epochs if epochs is None else epochs,
        batch_size=BATCH, seed=args.seed, desc=desc, progress=not args.no_progress, **kwargs)


def train_baseline(data: DigitsSplit, args: argparse.Namespace) -> nn.Module:
    """The plain network (ReLU, ordinary residuals) trained with the recipe's budget."""
    model = build(args)
    train(model, data, args, desc=f"baseline {args.arch}")
    return model


def compress_run(method: str, model: nn.Module, data: DigitsSplit, args: argparse.Namespace,
                 **kwargs) -> CompressResult:
    """``graphfold.train.compress`` with the recipe's epochs, budget, learning rate, seed and progress.

    The recipe folds the result itself (``fold_and_measure``), so compress only trains here.
    """
    options = TrainOptions(lr=args.lr, batch_size=BATCH, seed=args.seed, progress=not args.no_progress)
    return compress(model, (data.x_train, data.y_train), (data.x_val, data.y_val), method, args.epochs,
                    getattr(args, "budget", 1.0), options=options, fold=False, **kwargs)


def onnx_accuracy(model: onnx.ModelProto, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent of an ONNX model under onnxruntime (default CPU session)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x.numpy()})[0]
    return 100.0 * float((logits.argmax(1) == y.numpy()).mean())


@dataclass
class Row:
    """One line of a recipe's table."""

    method: str
    convs_export: int
    convs_folded: int
    params: int
    macs: int | None
    acc_torch: float
    acc_onnx: float
    folded_path: str
    reference_path: str = ""  # what latency_ratio divides by; the first row's folded model if empty
    latency_ratio: float | None = None
    latency_ms: float | None = None
    rewrites: dict[str, int] = field(default_factory=dict)
    validation: str = ""


def calibration(data: DigitsSplit) -> dict[str, np.ndarray]:
    """graphfold's calibration data for approximate folds: the training images, never the test set."""
    return {"input": data.x_train.numpy()}


def fold_and_measure(method: str, model: nn.Module, data: DigitsSplit, args: argparse.Namespace,
                     stem: str, **fold_options) -> Row:
    """Export with BatchNorm kept, fold with graphfold (validated), evaluate both on the test set.

    ``fold_options`` go to ``graphfold.fold``: ``fold_all``, or approximate options (``epsilon``,
    ``drop_branches``, ``tolerance``, ...) which then get the training images as calibration data.
    """
    exported = export_onnx(model, args.out / f"{stem}.onnx", data.input_shape, keep_batchnorm=True)
    if set(fold_options) - {"fold_all"}:
        fold_options.setdefault("calibration", calibration(data))
    folded, report = graphfold.fold(exported, **fold_options)
    folded_path = args.out / f"{stem}.folded.onnx"
    save_model(folded, str(folded_path))
    (args.out / f"{stem}.report.json").write_text(report.to_json())
    validation = report.validation.summary() if report.validation is not None else "not validated"
    return Row(
        method=method,
        convs_export=report.before["convs"],
        convs_folded=report.after["convs"],
        params=report.after["params"],
        macs=report.after["macs"],
        acc_torch=evaluate(model, data.x_test, data.y_test),
        acc_onnx=onnx_accuracy(folded, data.x_test, data.y_test),
        folded_path=str(folded_path),
        rewrites=dict(report.counts()),
        validation=validation,
    )


def measure_latency(rows: list[Row], args: argparse.Namespace) -> None:
    """Time every row's folded model and its reference in one interleaved run, batch 1."""
    for row in rows:
        row.reference_path = row.reference_path or rows[0].folded_path
    paths = list(dict.fromkeys(p for row in rows for p in (row.reference_path, row.folded_path)))
    result = bench(paths, threads=1, batch=1, opt_level="all", rounds=args.rounds, warmup=10, repeat=20)
    median = {path: timing.median_ms for path, timing in zip(paths, result.timings)}
    for row in rows:
        row.latency_ms = median[row.folded_path]
        row.latency_ratio = median[row.folded_path] / median[row.reference_path]


def _fmt_macs(macs: int | None) -> str:
    return "?" if macs is None else f"{macs / 1e6:.2f}M"


def markdown_table(rows: list[Row], versus_first: bool = True) -> str:
    """The recipe's table; ``versus_first`` adds the conv count change against the first row."""
    base = rows[0].convs_folded
    versus = " convs vs baseline |" if versus_first else ""
    lines = [
        f"| method | convs before -> after graphfold |{versus} params | MACs "
        "| test acc PyTorch | test acc folded ONNX | latency folded/baseline |",
        "|---" * (7 + versus_first) + "|",
    ]
    for row in rows:
        change = f" {100.0 * (row.convs_folded - base) / base:+.0f}% |" if versus_first else ""
        ratio = "-" if row.latency_ratio is None else f"{row.latency_ratio:.2f} ({row.latency_ms:.3f} ms)"
        lines.append(
            f"| {row.method} | {row.convs_export} -> {row.convs_folded} |{change} {row.params:,} "
            f"| {_fmt_macs(row.macs)} | {row.acc_torch:.2f}% | {row.acc_onnx:.2f}% | {ratio} |")
    return "\n".join(lines)


def finish(rows: list[Row], data: DigitsSplit, args: argparse.Namespace, title: str,
           extra: dict | None = None, note: str = "", versus_first: bool = True) -> None:
    """Time the rows, then print the table and save it as table.md and results.json."""
    measure_latency(rows, args)
    table = markdown_table(rows, versus_first)
    elapsed = time.time() - args.started[0]
    cpu = time.process_time() - args.started[1]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    footer = (f"digits {args.size}x{args.size}, test set of {len(data.y_test)}; "
              f"latency: onnxruntime {ort.__version__} CPU, 1 thread, ORT_ENABLE_ALL, batch 1, "
              f"median of {args.rounds} interleaved rounds; recipe wall time {elapsed:.0f} s, "
              f"CPU time {cpu:.0f} s")
    text = f"## {title}\n\n`{command}`\n\n{table}\n\n{footer}\n"
    if note:
        text += f"\n{note}\n"
    print("\n" + text)
    (args.out / "table.md").write_text(text)
    payload = {
        "title": title,
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [asdict(row) for row in rows],
        "wall_time_s": elapsed,
        "cpu_time_s": cpu,
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        **(extra or {}),
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
