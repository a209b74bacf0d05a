#!/usr/bin/env python
"""graphfold against the ONNX optimizers in common use, on every model in models/ and a few synthetic ones.

For each model, every optimizer runs file to file in its own subprocess (tools/speed_benchmark.py
holds the runners): graphfold (``graphfold.fold``, no validation, like the peers), onnxsim,
onnxslim, onnxoptimizer (its default fuse and eliminate passes) and onnxruntime's offline
optimizer (ORT_ENABLE_EXTENDED, saved model). Each output is then measured:

- nodes, convs, depth (longest chain of Conv/Gemm/MatMul), MACs: ``graphfold.stats``;
- max abs error of the outputs against the original: ``graphfold.check`` (onnxruntime with its
  optimizations off, seeded random inputs);
- latency over the original's: ``graphfold.bench`` (ORT_ENABLE_ALL, 1 thread, interleaved rounds);
- optimizer run time over plain onnx.load + onnx.save of the same model.

An optimizer that fails on a model gets its failure in the table; the run goes on. A peer
that is not installed (``pip install -e '.[peers]'``) fails on every model, and says so.

Your own models: ``--models DIR`` (repeatable) takes every ``*.onnx`` in DIR; input shapes come
from the model, else from ``DIR/shapes.json`` (``{"file.onnx": {"input": [1, 3, 224, 224]}}``),
else from ``--input-shape NAME:D0,D1,...``, else batch 1, 3 channels, 224 x 224.
``--section NAME`` writes the tables as one section of ``--out`` (between
``<!-- peer_benchmark:NAME -->`` markers, replaced on the next run) instead of the whole page;
a page regenerated without ``--section`` keeps what lies between its ``KEPT`` markers.
``tools/real_models.py DIR`` writes such a folder: onnx's bundled models and PyTorch exports
of published architectures.

    python tools/peer_benchmark.py                  # writes docs/benchmarks.md and docs/benchmarks.png
    python tools/peer_benchmark.py --quick --out /tmp/b.md --chart /tmp/b.png
    python tools/real_models.py /tmp/real && python tools/peer_benchmark.py --models /tmp/real \\
        --no-synthetic --no-speed --section real-models --chart ''
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_benchmark as speed  # noqa: E402
from speed_benchmark import REPO, NetBuilder, RunRecord, WeightSink  # noqa: E402

import graphfold  # noqa: E402
from graphfold.bench import bench  # noqa: E402
from graphfold.errors import GraphfoldError, first_line  # noqa: E402
from graphfold.inputs import parse_input_shape, real_inputs  # noqa: E402
from graphfold.shapes import infer_concrete  # noqa: E402
from graphfold.stats import model_stats  # noqa: E402

TOOLS = ["graphfold", "onnxsim", "onnxslim", "onnxoptimizer", "ort-extended"]
IMAGE_SIZE = 224
SAMPLE_MS = 50.0  # shortest latency sample (runs averaged) on small models


# ---------------------------------------------------------------- synthetic models

def build_repvgg(path: str, widths=(16, 32, 64), blocks=(2, 2, 2)) -> str:
    """RepVGG at training time: relu(BN(3x3 x) + BN(1x1 x) + BN(x)), identity branch where shapes allow."""
    net = NetBuilder(WeightSink(), seed=1)
    x, c_in = "input", 3
    for width, count in zip(widths, blocks):
        for block in range(count):
            stride = 2 if block == 0 else 1
            branches = [net.bn(net.conv(x, c_in, width, 3, stride), width),
                        net.bn(net.conv(x, c_in, width, 1, stride), width)]
            if stride == 1 and c_in == width:
                branches.append(net.bn(x, width))
            total = branches[0]
            for branch in branches[1:]:
                total = net.op("Add", [total, branch])
            x, c_in = net.op("Relu", [total]), width
    return _save(net, x, c_in, "repvgg", path)


def build_linear_mobilenetv2(path: str, widths=(16, 24, 32), blocks=(1, 2, 2), expand: int = 6) -> str:
    """MobileNetV2 with the activations inside its inverted residuals removed (DepthShrinker-style):
    each block is expand 1x1-BN, depthwise 3x3-BN, project 1x1-BN, plus the skip where shapes allow."""
    net = NetBuilder(WeightSink(), seed=2)
    x = _relu6(net, net.bn(net.conv("input", 3, widths[0], 3, stride=2), widths[0]))
    c_in = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            hidden = c_in * expand
            y = net.bn(net.conv(x, c_in, hidden, 1), hidden)
            y = net.bn(net.conv(y, hidden, hidden, 3, stride, group=hidden), hidden)
            y = net.bn(net.conv(y, hidden, width, 1), width)
            x = net.op("Add", [x, y]) if stride == 1 and c_in == width else y
            c_in = width
    x = _relu6(net, net.bn(net.conv(x, c_in, 4 * c_in, 1), 4 * c_in))
    return _save(net, x, 4 * c_in, "linear_mobilenetv2", path)


def _relu6(net: NetBuilder, x: str) -> str:
    low = net.sink.add(net.name("zero"), np.zeros((), np.float32))
    high = net.sink.add(net.name("six"), np.full((), 6.0, np.float32))
    return net.op("Clip", [x, low, high])


def _save(net: NetBuilder, x: str, channels: int, name: str, path: str) -> str:
    model = net.model(net.head(x, channels), [1, speed.CLASSES], name, IMAGE_SIZE)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def synthetic_models(folder: str) -> list[str]:
    return [build_repvgg(os.path.join(folder, "synthetic_repvgg.onnx")),
            build_linear_mobilenetv2(os.path.join(folder, "synthetic_linear_mobilenetv2.onnx")),
            speed.build_resnet(os.path.join(folder, "synthetic_resnet.onnx"), widths=(16, 32, 64),
                               blocks=(2, 2, 2), input_size=IMAGE_SIZE)]


# ---------------------------------------------------------------- measuring one model

@dataclass
class Row:
    """One optimizer's output on one model; ``failure`` says where it stopped, if it did."""

    tool: str
    run: RunRecord
    path: str = ""
    stats: dict = field(default_factory=dict)
    max_abs: float | None = None
    latency_ratio: float | None = None  # median over the original's median
    latency_ms: float | None = None
    min_ratio: float | None = None  # fastest sample over the original's fastest
    cpu_ratio: float | None = None  # process CPU time per run over the original's (1 thread)
    spread: float | None = None  # p90 / p10 of the samples
    rerun_ratio: float | None = None  # the original timed again: the measurement's own noise
    failure: str | None = None


@dataclass
class ModelResult:
    name: str
    input_shapes: dict[str, list[int]]
    original: Row
    rows: list[Row]


def bench_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """The model's own input dims, else ``given``'s; other symbolic ones become batch 1, 3 channels,
    224 x 224."""
    shapes = {}
    for vi in real_inputs(model.graph):
        if given and vi.name in given:
            shapes[vi.name] = list(given[vi.name])
            continue
        dims = vi.type.tensor_type.shape.dim
        resolved = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                resolved.append(dim.dim_value)
            else:
                resolved.append(1 if axis == 0 else 3 if axis == 1 and len(dims) == 4 else IMAGE_SIZE)
        shapes[vi.name] = resolved
    return shapes


# onnxruntime's offline optimizer writes its fused layers in its own domain; graphfold.stats only
# knows the standard ops, so for counting they are turned back into the layer they compute.
_FUSED_LAYERS = {"FusedConv": ("Conv", 3), "FusedGemm": ("Gemm", 3), "FusedMatMul": ("MatMul", 2)}


def standard_layers(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _FUSED_LAYERS:
            op_type, max_inputs = _FUSED_LAYERS[node.op_type]
            allowed = onnx.defs.get_schema(op_type).attributes
            kept = [a for a in node.attribute if a.name in allowed]
            inputs = list(node.input)[:max_inputs]
            node.op_type, node.domain = op_type, ""
            del node.attribute[:], node.input[:]
            node.attribute.extend(kept)
            node.input.extend(inputs)
    return copy


def measure_stats(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict:
    counted = standard_layers(model)
    return model_stats(counted, infer_concrete(counted, shapes))


def measure_model(src: str, folder: str, tools: list[str], args: argparse.Namespace,
                  given: dict[str, list[int]] | None = None) -> ModelResult:
    name = os.path.splitext(os.path.basename(src))[0]
    original = onnx.load(src)
    shapes = bench_shapes(original, given)
    baseline = speed.measure("load+save", src, os.path.join(folder, f"{name}.load+save.onnx"), args.repeats,
                             args.timeout, warmup=1)
    first = Row("original", baseline, src, measure_stats(original, shapes), max_abs=0.0)
    if not baseline.ok:
        first.failure = f"onnx.load + onnx.save failed: {baseline.error}"
    rows = []
    for tool in tools:
        dst = os.path.join(folder, f"{name}.{tool}.onnx")
        row = Row(tool, speed.measure(tool, src, dst, args.repeats, args.timeout, warmup=1), dst)
        rows.append(row)
        if not row.run.ok:
            row.failure = f"optimizer failed: {row.run.error}"
            continue
        try:
            optimized = onnx.load(dst)
            row.stats = measure_stats(optimized, shapes)
            row.max_abs = graphfold.check(original, optimized, input_shapes=shapes).max_abs
        except Exception as exc:  # a peer's output that will not load, count or run is a result too
            row.failure = f"output unusable: {first_line(exc)[:160]}"
    _measure_latency(first, [r for r in rows if r.failure is None], shapes, args)
    return ModelResult(name, shapes, first, rows)


def _measure_latency(first: Row, rows: list[Row], shapes: dict[str, list[int]],
                     args: argparse.Namespace) -> None:
    # An output that wants inputs the original does not have (ort-extended on some old models) cannot
    # be fed the same data: it alone goes untimed.
    expected = _input_names(first.path)
    for row in rows:
        names = _input_names(row.path)
        if names != expected:
            row.failure = f"latency not measured: its inputs {sorted(names - expected)[:3]}... are not the original's"
    rows = [row for row in rows if row.failure is None]
    try:
        # Samples shorter than a few scheduler slices turn into all-or-nothing on a busy machine;
        # batch enough runs per sample to span about SAMPLE_MS.
        probe = bench([first.path], input_shapes=shapes, rounds=1, warmup=1, repeat=3)
        repeat = max(args.repeat, math.ceil(SAMPLE_MS / max(probe.timings[0].median_ms, 1e-3)))
        result = bench([first.path, first.path] + [r.path for r in rows], input_shapes=shapes, threads=1,
                       opt_level="all", rounds=args.rounds, warmup=args.warmup, repeat=repeat)
    except GraphfoldError as exc:
        for row in [first] + rows:
            row.failure = row.failure or f"latency not measured: {first_line(exc)[:160]}"
        return
    original, rerun, *others = result.timings
    first.rerun_ratio = rerun.ratio
    for row, timing in zip([first] + rows, [original] + others):
        row.latency_ratio, row.latency_ms = timing.ratio, timing.median_ms
        row.min_ratio, row.cpu_ratio, row.spread = timing.min_ms / original.min_ms, timing.cpu_ratio, timing.spread


def _input_names(path: str) -> set[str]:
    return {vi.name for vi in real_inputs(onnx.load(path, load_external_data=False).graph)}


# ---------------------------------------------------------------- report

COLUMNS = ["optimizer", "nodes", "convs", "depth", "MACs", "max abs error", "latency x", "min x", "CPU x",
           "spread", "optimize time x"]


def _count(value) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _cells(row: Row, baseline: RunRecord) -> list[str]:
    """One table row; a failure shows as "failed" in the cells it left empty (reason below the table)."""
    name = f"**{row.tool}**" if row.tool == "graphfold" else row.tool
    if not row.run.ok and row.tool != "original":
        return [name] + ["failed"] * (len(COLUMNS) - 1)
    measured = [_ratio(row.min_ratio), _ratio(row.cpu_ratio), _ratio(row.spread)]
    stats = row.stats
    counts = [_count(stats.get(key)) if stats else "failed" for key in ("nodes", "convs", "depth", "macs")]
    if row.tool == "original":
        error = "-"
    else:
        error = "failed" if row.max_abs is None else "0" if row.max_abs == 0 else f"{row.max_abs:.1e}"
    latency = "failed" if row.latency_ratio is None else f"{row.latency_ratio:.2f}"
    timing = f"{row.run.seconds / baseline.seconds:.2f}" if baseline.ok else "failed"
    if row.tool == "original":
        if row.latency_ms is not None:
            latency += f" ({row.latency_ms:.2f} ms, rerun {row.rerun_ratio:.2f})"
        timing += f" ({baseline.seconds * 1000:.0f} ms)" if baseline.ok else ""
    return [name, *counts, error, latency, *measured, timing]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _failures(result: ModelResult) -> list[str]:
    rows = [result.original] + result.rows
    return [f"- {row.tool}: {row.failure}" for row in rows if row.failure]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for cells in rows:
        cells = cells + [""] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_table(results: list[ModelResult], tools: list[str]) -> list[str]:
    """Per model and optimizer: depth after / before and latency ratio, in one cell each."""
    rows = []
    for result in results:
        depth = result.original.stats.get("depth") or 0
        cells = [f"{result.name} (depth {depth})"]
        for row in result.rows:
            if row.failure and not row.stats:
                cells.append("failed")
                continue
            latency = f"{row.latency_ratio:.2f}x" if row.latency_ratio is not None else "-"
            if row.cpu_ratio is not None:
                latency += f" (CPU {row.cpu_ratio:.2f}x)"
            cells.append(f"{row.stats.get('depth')} / {latency}")
        rows.append(cells)
    return markdown_table(["model", *tools], rows)


def versions() -> str:
    names = ["onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "numpy"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join([f"graphfold {graphfold.__version__}"] + found)


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_how() -> list[str]:
    """What each column means and how it is measured."""
    return [
        "How each column is measured:",
        "",
        "- **nodes, convs, depth, MACs**: `graphfold.stats` on the optimized model. Depth is the longest "
        "chain of Conv/Gemm/MatMul layers. onnxruntime's fused layers (FusedConv, FusedGemm) count as "
        "the layer they compute.",
        "- **max abs error**: largest |optimized - original| over all outputs, onnxruntime with its own "
        "optimizations off, 3 seeded random inputs (`graphfold.check`).",
        "- **latency x**: median latency over the original's, onnxruntime CPU at ORT_ENABLE_ALL, 1 thread, "
        "models timed in interleaved rounds (`graphfold.bench`), each sample the mean of enough runs to "
        f"span about {SAMPLE_MS:.0f} ms; below 1 is faster. The original is "
        "timed twice: the second copy's ratio (*rerun*, in the original's row) is the noise of the "
        "measurement on that model; read differences of that size as ties. **min x**: fastest sample "
        "over the original's fastest. **CPU x**: this process's CPU time per run over the original's "
        "(with one thread, the work itself, which other load on the machine does not inflate). "
        "**spread**: p90 / p10 of the samples; over 1.2 the medians are not to be trusted. Differences "
        "under about 5% are ties.",
        "- **optimize time x**: the optimizer's wall time, file to file, over plain `onnx.load` + "
        "`onnx.save` of the same model; each in a fresh process, median of the runs after one warm-up "
        "run, imports not counted. graphfold runs without its validation here, as the peers do; onnxsim "
        "runs path to path without its check. On small models fixed costs dominate this ratio.",
        "",
        "onnxoptimizer's BatchNorm fusion writes the folded weights as arithmetic nodes on the "
        "initializers (Sqrt, Div, Mul, ...) that onnxruntime constant-folds at load time, hence its "
        "node counts.",
        "",
    ]


def machine_line() -> str:
    return (f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average {load_average()} when the run ended. "
            f"Versions: {versions()}.")


def result_lines(results: list[ModelResult], tools: list[str], skipped: list[str], level: str = "##",
                 chart: str | None = None, page: str = "") -> list[str]:
    """The summary table, the chart, one table per model and the models that could not be read."""
    lines = [f"{level} Summary: depth after / latency ratio", "", *summary_table(results, tools), ""]
    if chart:
        lines += [f"![latency and depth against the original]({os.path.relpath(chart, os.path.dirname(page))})", ""]
    for result in results:
        shapes = ", ".join(f"{n} {'x'.join(map(str, d))}" for n, d in result.input_shapes.items())
        lines += [f"{level} {result.name}", "", f"Input: {shapes}.", ""]
        rows = [_cells(r, result.original.run) for r in [result.original] + result.rows]
        lines += markdown_table(COLUMNS, rows) + [""]
        if _failures(result):
            lines += ["Failures:", "", *_failures(result), ""]
    if skipped:
        lines += [f"{level} Models not benchmarked", ""] + [f"- {line}" for line in skipped] + [""]
    return lines


def write_markdown(path: str, chart: str | None, results: list[ModelResult], tools: list[str],
                   command: str, speed_results: list[tuple[str, int, list[RunRecord]]],
                   skipped: list[str]) -> None:
    lines = [
        "# Benchmarks: graphfold and the ONNX optimizers in common use",
        "",
        f"Produced by `{command}`; rerun it to refresh this page and its chart.",
        "",
        machine_line(),
        "",
        *measured_how(),
        *kept_part(path),
        *result_lines(results, tools, skipped, chart=chart, page=path),
    ]
    for case, size, records in speed_results:
        runs = "one run" if case == "resnet-2GB" else "median time of the runs"
        lines += [f"## Optimizer speed on a large model: {case}", "",
                  f"A synthetic ResNet of {size / 2**20:.0f} MiB (Conv-BN-Relu blocks with residual Adds, "
                  f"BN unfolded), each tool file to file in its own process, {runs}; `extra RSS` is the "
                  "peak resident memory above what the process held after its imports. Same runners as "
                  "`python tools/speed_benchmark.py`.", ""]
        lines += markdown_table(speed.SPEED_HEADER, speed.speed_rows(records)) + [""]
    with open(path, "w") as out:
        out.write("\n".join(lines))


KEPT = ("<!-- kept by peer_benchmark.py -->", "<!-- /kept by peer_benchmark.py -->")


def kept_part(path: str) -> list[str]:
    """The part of the old page between the KEPT markers (sections written with --section and the
    text around them), which regenerating the page keeps as it is."""
    text = open(path).read() if os.path.exists(path) else ""
    if KEPT[0] not in text or KEPT[1] not in text:
        return []
    return [text[text.index(KEPT[0]):text.index(KEPT[1]) + len(KEPT[1])], ""]


def write_section(path: str, name: str, results: list[ModelResult], tools: list[str], command: str,
                  skipped: list[str]) -> None:
    """Replace the section between ``<!-- peer_benchmark:NAME -->`` markers of ``path`` (appended if
    absent), leaving the rest of the page as it is."""
    start, end = f"<!-- peer_benchmark:{name} -->", f"<!-- /peer_benchmark:{name} -->"
    body = [start, "", f"Produced by `{command}`. Columns as described at the top of the page; **min x** is "
            "the fastest sample over the original's fastest, **CPU x** this process's CPU time per run over the "
            "original's (1 thread: the work itself, which other load does not inflate), **spread** p90 / p10 "
            "of the samples (over 1.2, trust min x and CPU x rather than the median).", "", machine_line(), "",
            *result_lines(results, tools, skipped, level="###"), end]
    text = open(path).read() if os.path.exists(path) else ""
    if start in text and end in text:
        text = text[:text.index(start)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    with open(path, "w") as out:
        out.write(text)


def model_folders(folders: list[str], given: dict[str, list[int]]) -> list[tuple[str, dict[str, list[int]]]]:
    """Every ``*.onnx`` in ``folders`` with the input shapes for it: ``shapes.json`` beside it, over
    the ``--input-shape`` ones."""
    found = []
    for folder in folders:
        table = {}
        if os.path.exists(os.path.join(folder, "shapes.json")):
            with open(os.path.join(folder, "shapes.json")) as handle:
                table = json.load(handle)
        for path in sorted(glob.glob(os.path.join(folder, "*.onnx"))):
            found.append((path, {**given, **table.get(os.path.basename(path), {})}))
    return found


def plot_results(results: list[ModelResult], tools: list[str], path: str) -> None:
    """Two panels of grouped bars: latency and depth of each optimizer's output over the original's."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(7.0, 1.6 * len(results) + 3), 6.5), layout="constrained")
    panels = figure.subplots(2, 1, sharex=True)
    width = 0.8 / len(tools)
    for index, tool in enumerate(tools):
        latency, depth = [], []
        for result in results:
            row = next(r for r in result.rows if r.tool == tool)
            latency.append(row.latency_ratio if row.latency_ratio is not None else np.nan)
            base = result.original.stats.get("depth") or 0
            depth.append(row.stats["depth"] / base if row.stats and base else np.nan)
        offsets = np.arange(len(results)) + (index - (len(tools) - 1) / 2) * width
        panels[0].bar(offsets, latency, width, label=tool)
        panels[1].bar(offsets, depth, width, label=tool)
    for panel, label in zip(panels, ("latency / original", "depth / original")):
        panel.axhline(1.0, color="black", linewidth=0.8)
        panel.set_ylabel(label)
    panels[0].set_title("onnxruntime CPU, 1 thread, ORT_ENABLE_ALL (lower is better; missing bar = failed)")
    panels[0].legend(ncols=len(tools), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.02))
    panels[1].set_xticks(range(len(results)), [r.name for r in results], rotation=15, ha="right")
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="ONNX models (default: models/*.onnx and the synthetic set)")
    parser.add_argument("--models", dest="folders", action="append", default=[], metavar="DIR",
                        help="every *.onnx in DIR (repeatable); input shapes from DIR/shapes.json")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="shape for an input the model leaves dynamic, on every model that has it")
    parser.add_argument("--section", metavar="NAME",
                        help="write the results as section NAME of --out, leaving the rest of the page")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic RepVGG/MobileNetV2/ResNet")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS)
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--chart", help="chart path ('' for none; default docs/benchmarks.png, none with --section)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (default 20)")
    parser.add_argument("--repeat", type=int, default=10,
                        help=f"least runs averaged per latency sample; more on small models, to span {SAMPLE_MS:.0f} ms")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="optimizer runs per model; median time")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per optimizer run")
    parser.add_argument("--no-speed", action="store_true", help="skip the ~100 MB optimizer speed case")
    parser.add_argument("--big", action="store_true",
                        help="add the > 2 GB speed case (minutes; needs ~16 GB of RAM for onnxslim)")
    parser.add_argument("--quick", action="store_true", help="few rounds and runs, no speed case: a smoke test")
    parser.add_argument("--keep", metavar="DIR", help="keep the built and optimized models in DIR")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeat, args.warmup, args.repeats, args.no_speed = 3, 2, 1, 1, True
    if args.chart is None:
        args.chart = "" if args.section else os.path.join(REPO, "docs", "benchmarks.png")
    # A section holds the model tables only: the speed cases belong to the whole page.
    args.no_speed = args.no_speed or bool(args.section)

    with tempfile.TemporaryDirectory(prefix="graphfold-peers-") as scratch:
        folder = args.keep or scratch
        os.makedirs(folder, exist_ok=True)
        given = dict(parse_input_shape(spec) for spec in args.input_shape)
        paths = [(path, given) for path in args.models] + model_folders(args.folders, given)
        if not paths:
            paths = [(path, given) for path in sorted(glob.glob(os.path.join(REPO, "models", "*.onnx")))]
        if not args.no_synthetic:
            paths += [(path, given) for path in synthetic_models(folder)]
        results, skipped = [], []
        for src, shapes in paths:
            print(f"{os.path.basename(src)} ...", file=sys.stderr, flush=True)
            try:
                results.append(measure_model(src, folder, args.tools, args, shapes))
            except Exception as exc:  # the original itself cannot be read or counted
                skipped.append(f"{os.path.basename(src)}: {first_line(exc)[:160]}")
        cases = [] if args.no_speed else ["resnet-100MB"] + (["resnet-2GB"] if args.big else [])
        speed_results = []
        for case in cases:
            print(f"speed case {case} ...", file=sys.stderr, flush=True)
            repeats = 1 if case == "resnet-2GB" else args.repeats  # one 2 GB run takes minutes
            speed_results.append((case, *speed.run_speed_case(case, folder, args.tools, repeats, args.timeout)))
    if args.chart:
        plot_results(results, args.tools, args.chart)
    command = "python tools/peer_benchmark.py" + ("".join(f" {a}" for a in argv) if argv else
                                                   "".join(f" {a}" for a in sys.argv[1:]))
    if args.section:
        write_section(args.out, args.section, results, args.tools, command, skipped)
    else:
        write_markdown(args.out, args.chart or None, results, args.tools, command, speed_results, skipped)
    print(f"wrote {args.out}" + (f" and {args.chart}" if args.chart else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
