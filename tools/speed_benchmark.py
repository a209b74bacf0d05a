#!/usr/bin/env python
"""How fast graphfold and its peers optimize big models, against plain onnx.load + onnx.save.

Builds synthetic ResNet-style models in a temp dir (no downloads): about 100 MB by default and,
with --big, one over the 2 GB protobuf limit stored with external data. Each optimizer then runs
file-to-file in its own subprocess, so its peak RSS is its own (VmHWM; "extra" is the peak above
what the process held after its imports: what the model cost) and a crash or hang is recorded,
not fatal.
Times cover load, optimize and save, not the Python imports.

    python tools/speed_benchmark.py            # ~100 MB model, every optimizer
    python tools/speed_benchmark.py --big      # adds a > 2 GB model (needs ~3x its size in RAM)

tools/peer_benchmark.py imports the model builder and the optimizer runners from here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from graphfold.io import EXTERNAL_DATA_THRESHOLD, needs_external_data  # noqa: E402

OPSET = 17
CLASSES = 10


# ---------------------------------------------------------------- synthetic models

class WeightSink:
    """Collects initializers in memory or, for models over 2 GB, streams them to one data file."""

    def __init__(self, data_path: str | None = None) -> None:
        self.initializers: list[TensorProto] = []
        self.data_path = data_path
        self._data = open(data_path, "wb") if data_path else None

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self._data is None:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        for key, value in (("location", os.path.basename(self.data_path)), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        if self._data is not None:
            self._data.close()


class NetBuilder:
    """Small helper to write Conv/BN/activation graphs with random weights."""

    def __init__(self, sink: WeightSink, seed: int = 0) -> None:
        self.sink = sink
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1, group: int = 1,
             pad: int | None = None, bias: bool = False) -> str:
        name = self.name("conv")
        fan_in = c_in // group * kernel * kernel
        weight = self.rng.standard_normal((c_out, c_in // group, kernel, kernel), dtype=np.float32)
        inputs = [x, self.sink.add(f"{name}.w", weight * np.float32(np.sqrt(2.0 / fan_in)))]
        if bias:
            inputs.append(self.sink.add(f"{name}.b", 0.1 * self.rng.standard_normal(c_out)))
        pad = kernel // 2 if pad is None else pad
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, kernel_shape=[kernel] * 2,
                                           strides=[stride] * 2, pads=[pad] * 4, group=group))
        return name

    def bn(self, x: str, channels: int) -> str:
        name = self.name("bn")
        params = [1.0 + 0.1 * self.rng.standard_normal(channels), 0.1 * self.rng.standard_normal(channels),
                  0.1 * self.rng.standard_normal(channels), 0.5 + self.rng.random(channels)]
        inputs = [x] + [self.sink.add(f"{name}.{p}", v) for p, v in zip(("scale", "bias", "mean", "var"), params)]
        self.nodes.append(helper.make_node("BatchNormalization", inputs, [name], name=name, epsilon=1e-5))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def head(self, x: str, channels: int, classes: int = CLASSES) -> str:
        pooled = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        weight = self.sink.add("fc.w", 0.01 * self.rng.standard_normal((classes, channels)))
        bias = self.sink.add("fc.b", np.zeros(classes))
        return self.op("Gemm", [pooled, weight, bias], transB=1)

    def model(self, output: str, output_shape: list[int], graph_name: str,
              input_size: int) -> onnx.ModelProto:
        self.sink.close()
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, input_size, input_size])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)], self.sink.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def build_resnet(path: str, widths: tuple[int, ...], blocks: tuple[int, ...], input_size: int = 224,
                 external: bool = False, seed: int = 0) -> str:
    """ResNet with basic blocks (Conv-BN-Relu-Conv-BN + skip, Relu), BN unfolded; saved to ``path``."""
    sink = WeightSink(path + ".data" if external else None)
    net = NetBuilder(sink, seed)
    x = net.op("Relu", [net.bn(net.conv("input", 3, widths[0], 3, stride=2), widths[0])])
    c_in = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            y = net.op("Relu", [net.bn(net.conv(x, c_in, width, 3, stride), width)])
            y = net.bn(net.conv(y, width, width, 3), width)
            skip = x if stride == 1 and c_in == width else net.bn(net.conv(x, c_in, width, 1, stride), width)
            x = net.op("Relu", [net.op("Add", [y, skip])])
            c_in = width
    model = net.model(net.head(x, c_in), [1, CLASSES], "resnet", input_size)
    onnx.save_model(model, path)  # external tensors already point at path + ".data"
    return path


def model_bytes(path: str) -> int:
    """Size on disk of a model and the external data files it names."""
    model = onnx.load(path, load_external_data=False)
    files = {entry.value for tensor in _all_tensors(model) for entry in tensor.external_data
             if entry.key == "location"}
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, f)) for f in files)


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


# ---------------------------------------------------------------- optimizers, file to file

def save_plain(model: onnx.ModelProto, path: str) -> None:
    """onnx.save, with external data when protobuf could not hold the model."""
    onnx.save_model(model, path, save_as_external_data=needs_external_data(model),
                    all_tensors_to_one_file=True, location=os.path.basename(path) + ".data")


def run_load_save(src: str, dst: str) -> None:
    save_plain(onnx.load(src), dst)


def run_graphfold(src: str, dst: str) -> None:
    import graphfold
    import graphfold.io
    model, _report = graphfold.fold(src, check=False)
    graphfold.io.save_model(model, dst)


def run_onnxsim(src: str, dst: str) -> None:
    import onnxsim
    # Path to path is onnxsim's own large-model route (what its CLI does); no output check.
    onnxsim.simplify(src, output_path=dst)


def run_onnxslim(src: str, dst: str) -> None:
    import onnxslim
    save_plain(onnxslim.slim(onnx.load(src)), dst)


def run_onnxoptimizer(src: str, dst: str) -> None:
    import onnxoptimizer
    save_plain(onnxoptimizer.optimize(onnx.load(src)), dst)  # its default fuse + eliminate passes


def run_ort_extended(src: str, dst: str) -> None:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = dst
    if model_bytes(src) >= EXTERNAL_DATA_THRESHOLD:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         os.path.basename(dst) + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


OPTIMIZERS: dict[str, Callable[[str, str], None]] = {
    "load+save": run_load_save,
    "graphfold": run_graphfold,
    "onnxsim": run_onnxsim,
    "onnxslim": run_onnxslim,
    "onnxoptimizer": run_onnxoptimizer,
    "ort-extended": run_ort_extended,
}
# What each runner imports, loaded before the baseline RSS is taken.
_IMPORTS = {"graphfold": ["graphfold"], "onnxsim": ["onnxsim"], "onnxslim": ["onnxslim"],
            "onnxoptimizer": ["onnxoptimizer"], "ort-extended": ["onnxruntime"]}


@dataclass
class RunRecord:
    """One optimizer on one model: median seconds over repeats and peak memory, or the failure."""

    tool: str
    seconds: float | None = None
    peak_rss_mb: float | None = None
    extra_rss_mb: float | None = None  # peak minus RSS after imports: what the model cost
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def measure(tool: str, src: str, dst: str, repeats: int = 1, timeout: float = 1800.0,
            warmup: int = 0) -> RunRecord:
    """Run ``tool`` on ``src`` -> ``dst`` in a fresh interpreter; never raises for a tool failure.

    ``warmup`` untimed runs come first: on small models the first run's one-off costs (lazy
    imports, cold file cache) would otherwise dominate.
    """
    command = [sys.executable, os.path.abspath(__file__), "--worker", tool, src, dst,
               "--repeats", str(repeats), "--warmup", str(warmup)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return RunRecord(tool, error=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode}" + (f" ({reason})" if lines else "")
        return RunRecord(tool, error=reason[:200])
    return RunRecord(tool, **json.loads(done.stdout.strip().splitlines()[-1]))


def _peak_rss_kb() -> int:
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's RSS at fork.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def _worker(tool: str, src: str, dst: str, repeats: int, warmup: int) -> None:
    for module in _IMPORTS.get(tool, []):
        __import__(module)
    baseline_kb = _peak_rss_kb()
    for _ in range(warmup):
        OPTIMIZERS[tool](src, dst)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        OPTIMIZERS[tool](src, dst)
        seconds.append(time.perf_counter() - start)
    peak_kb = _peak_rss_kb()
    print(json.dumps({"seconds": statistics.median(seconds), "peak_rss_mb": peak_kb / 1024,
                      "extra_rss_mb": (peak_kb - baseline_kb) / 1024}))


# ---------------------------------------------------------------- cases and report

# ResNet shapes: about 100 MB, and about 2.1 GB (over the protobuf limit, so external data).
SPEED_CASES = {
    "resnet-100MB": (dict(widths=(128, 256, 512), blocks=(2, 3, 5)), False),
    "resnet-2GB": (dict(widths=(512, 1024, 2048), blocks=(2, 2, 7)), True),
}
SPEED_HEADER = ["tool", "seconds", "x load+save", "peak RSS MB", "extra RSS MB", "x load+save"]


def run_speed_case(name: str, folder: str, tools: list[str], repeats: int = 1, timeout: float = 1800.0,
                   keep: bool = False) -> tuple[int, list[RunRecord]]:
    """Build case ``name`` in ``folder`` and time load+save and ``tools`` on it: (bytes, records)."""
    shape, external = SPEED_CASES[name]
    src = build_resnet(os.path.join(folder, f"{name}.onnx"), external=external, **shape)
    records = []
    for tool in ["load+save"] + [t for t in tools if t != "load+save"]:
        dst = os.path.join(folder, f"{name}.{tool}.onnx")
        records.append(measure(tool, src, dst, repeats, timeout))
        for leftover in (dst, dst + ".data"):
            if not keep and os.path.exists(leftover):
                os.remove(leftover)  # two 2 GB outputs at once would fill a small temp dir
    return model_bytes(src), records


def speed_rows(records: list[RunRecord]) -> list[list[str]]:
    """Cells under ``SPEED_HEADER``, ratios to the first record (load+save); failures in one cell."""
    base = records[0]
    rows = []
    for r in records:
        if not r.ok:
            rows.append([r.tool, f"FAILED: {r.error}"])
            continue
        time_ratio = f"{r.seconds / base.seconds:.2f}" if base.ok else "-"
        mem_ratio = f"{r.extra_rss_mb / base.extra_rss_mb:.2f}" if base.ok and base.extra_rss_mb > 0 else "-"
        rows.append([r.tool, f"{r.seconds:.2f}", time_ratio, f"{r.peak_rss_mb:.0f}",
                     f"{r.extra_rss_mb:.0f}", mem_ratio])
    return rows


def format_speed_table(records: list[RunRecord]) -> str:
    widths = [14, 8, 11, 11, 12, 11]
    lines = []
    for cells in [SPEED_HEADER] + speed_rows(records):
        if len(cells) == 2:  # a failure
            lines.append(f"{cells[0]:<{widths[0]}} {cells[1]}")
            continue
        lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                              for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="also benchmark a > 2 GB model with external data")
    parser.add_argument("--tools", nargs="+", choices=list(OPTIMIZERS)[1:], default=list(OPTIMIZERS)[1:],
                        help="optimizers to run (load+save always runs, as the baseline)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool; the median is reported")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per tool run")
    parser.add_argument("--keep", metavar="DIR", help="build models and outputs in DIR and keep them")
    args = parser.parse_args(argv)

    cases = ["resnet-100MB"] + (["resnet-2GB"] if args.big else [])
    with tempfile.TemporaryDirectory(prefix="graphfold-speed-") as scratch:
        folder = args.keep or scratch
        os.makedirs(folder, exist_ok=True)
        for name in cases:
            size, records = run_speed_case(name, folder, args.tools, args.repeats, args.timeout,
                                           keep=bool(args.keep))
            print(f"\n{name}: {size / 2**20:.0f} MiB on disk, {os.cpu_count()} CPUs")
            print(format_speed_table(records), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", dest="tool")
        worker.add_argument("src")
        worker.add_argument("dst")
        worker.add_argument("--repeats", type=int, default=1)
        worker.add_argument("--warmup", type=int, default=0)
        ns = worker.parse_args()
        _worker(ns.tool, ns.src, ns.dst, ns.repeats, ns.warmup)
    else:
        sys.exit(main())
