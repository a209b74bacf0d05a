#!/usr/bin/env python
"""How fast graphfold and its peers optimize big models, against plain onnx.load + onnx.save.

By default, whole programs side by side, each run in a fresh process as a user runs it
(interpreter start, imports, load, optimize, save): plain load+save, ``graphfold --no-check``,
``graphfold`` with its validation, onnxsim, onnxslim and onnxruntime's offline optimizer, on
RepVGG models of about 40 MB and 400 MB built here (no downloads). Runs are repeated and
interleaved; wall time (min and median), CPU time and peak RSS (the child's own VmHWM) are
reported, with the machine's load. A tool that is not installed or fails gets its error in
the table.

    python tools/speed_benchmark.py                                # both models, 5 rounds
    python tools/speed_benchmark.py --cases repvgg-40MB --repeats 9 --markdown docs/benchmarks.md
    python tools/speed_benchmark.py --baseline-repo /path/to/older/checkout   # before and after
    python tools/speed_benchmark.py --in-process | --big          # the older in-process timing

``--in-process`` times load, optimize and save inside one worker process per tool (imports not
counted) on a ~100 MB ResNet; ``--big`` adds a > 2 GB one with external data.
tools/peer_benchmark.py imports the model builders and the in-process runners from here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
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
    graphfold.fold_file(src, dst, check=False)  # file to file, as the command line runs


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


# ---------------------------------------------------------------- whole runs, a fresh process each

def build_repvgg(path: str, widths: tuple[int, ...], blocks: tuple[int, ...], input_size: int = 224,
                 seed: int = 0) -> str:
    """RepVGG as trained: relu(BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x)]), the identity branch where
    shapes allow; the first block of each stage has stride 2. Saved to ``path``."""
    net = NetBuilder(WeightSink(), seed)
    x, c_in = "input", 3
    for width, count in zip(widths, blocks):
        for block in range(count):
            stride = 2 if block == 0 else 1
            total = net.op("Add", [net.bn(net.conv(x, c_in, width, 3, stride), width),
                                   net.bn(net.conv(x, c_in, width, 1, stride), width)])
            if stride == 1 and c_in == width:
                total = net.op("Add", [total, net.bn(x, width)])
            x, c_in = net.op("Relu", [total]), width
    onnx.save_model(net.model(net.head(x, c_in), [1, CLASSES], "repvgg", input_size), path)
    return path


# RepVGG-A layouts (five stages, 224 -> 7) of about 40 MB (A0 with wider last stages) and 400 MB,
# both under the protobuf limit.
PROCESS_CASES = {
    "repvgg-40MB": dict(widths=(48, 48, 96, 224, 1024), blocks=(1, 2, 4, 14, 1)),
    "repvgg-400MB": dict(widths=(64, 64, 256, 640, 1792), blocks=(1, 2, 4, 14, 2)),
}

# Each tool as a whole program: interpreter start, imports, load, optimize, save. A prelude makes
# the child report its own peak RSS (VmHWM) as it exits: ru_maxrss from wait4 would include the
# parent's RSS at fork.
_PRELUDE = """import atexit, os
def _peak():
    with open('/proc/self/status') as status:
        kb = [line.split()[1] for line in status if line.startswith('VmHWM:')]
    os.write(2, ('\\nVmHWM_KB ' + (kb[0] if kb else '0') + '\\n').encode())
atexit.register(_peak)
"""
_GRAPHFOLD_CLI = "import sys\nfrom graphfold.cli import main\nsys.exit(main())\n"  # as the console script
PROGRAMS: dict[str, tuple[str, Callable[[str, str], list[str]]]] = {
    "load+save": ("import sys, onnx\nonnx.save_model(onnx.load(sys.argv[1]), sys.argv[2])\n",
                  lambda src, dst: [src, dst]),
    "graphfold-no-check": (_GRAPHFOLD_CLI, lambda src, dst: [src, "-o", dst, "--no-check", "-q"]),
    "graphfold": (_GRAPHFOLD_CLI, lambda src, dst: [src, "-o", dst, "-q"]),
    # Path to path is onnxsim's large-model route; check_n=0 (its default): no output check.
    "onnxsim": ("import sys, onnxsim\nonnxsim.simplify(sys.argv[1], output_path=sys.argv[2])\n",
                lambda src, dst: [src, dst]),
    "onnxslim": ("import sys, onnx, onnxslim\nonnx.save_model(onnxslim.slim(onnx.load(sys.argv[1])), sys.argv[2])\n",
                 lambda src, dst: [src, dst]),
    "ort-offline": ("import sys, onnxruntime as ort\n"
                    "options = ort.SessionOptions()\n"
                    "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
                    "options.optimized_model_filepath = sys.argv[2]\n"
                    "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])\n",
                    lambda src, dst: [src, dst]),
}


@dataclass
class ProcessRun:
    """One whole-program run: wall and CPU seconds, peak RSS, or the failure."""

    wall: float = 0.0
    cpu: float = 0.0
    peak_rss_mb: float = 0.0
    error: str | None = None


def run_program(tool: str, src: str, dst: str, repo: str = REPO, timeout: float = 1800.0) -> ProcessRun:
    """``tool`` on ``src`` -> ``dst`` as a fresh interpreter; graphfold comes from ``repo``."""
    body, args = PROGRAMS[tool]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        # Run from the output's folder: python -c puts the working directory first on the path,
        # where a checkout's own graphfold would shadow ``repo``'s.
        child = subprocess.Popen([sys.executable, "-c", _PRELUDE + body, *args(src, dst)],
                                 stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                 cwd=os.path.dirname(os.path.abspath(dst)))
        try:
            _, status, usage = _wait4(child, timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return ProcessRun(error=f"timed out after {timeout:.0f} s")
        wall = time.perf_counter() - start
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").splitlines()
    peaks = [line.split()[1] for line in lines if line.startswith("VmHWM_KB ")]
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not peaks:
        messages = [line for line in lines if line.strip() and not line.startswith("VmHWM_KB ")]
        return ProcessRun(error=(messages[-1] if messages else f"exit code {code}")[:200])
    return ProcessRun(wall, usage.ru_utime + usage.ru_stime, int(peaks[-1]) / 1024)


def _wait4(child: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.args, timeout)
        time.sleep(0.005)


BASELINE = " (baseline)"  # suffix of a graphfold row taken from --baseline-repo


def compare_programs(src: str, folder: str, tools: list[str], repeats: int, repo: str = REPO,
                     timeout: float = 1800.0, progress: Callable[[str], None] | None = None,
                     baseline_repo: str | None = None) -> dict[str, list[ProcessRun]]:
    """Every tool ``repeats`` times on ``src``, interleaved (round r runs each tool once, in an
    order rotated by r) so that load on a shared machine falls on all of them alike. A tool
    named with the ``BASELINE`` suffix runs graphfold from ``baseline_repo``. An untimed
    load+save and a byte-compilation of graphfold come first, so no run pays for a cold cache."""
    runs: dict[str, list[ProcessRun]] = {tool: [] for tool in tools}
    for folder_ in filter(None, [repo, baseline_repo]):
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(folder_, "graphfold")],
                       capture_output=True)
    run_program("load+save", src, os.path.join(folder, "warmup.onnx"), repo, timeout)
    for round_index in range(repeats):
        order = tools[round_index % len(tools):] + tools[:round_index % len(tools)]
        for tool in order:
            dst = os.path.join(folder, "out.onnx")
            program, source = (tool[:-len(BASELINE)], baseline_repo) if tool.endswith(BASELINE) else (tool, repo)
            runs[tool].append(run_program(program, src, dst, source, timeout))
            if progress:
                progress(f"round {round_index + 1}/{repeats} {tool}: {runs[tool][-1].wall:.2f} s")
            if os.path.exists(dst):
                os.remove(dst)
    return runs


PROCESS_HEADER = ["tool", "wall min s", "wall median s", "x load+save (min)", "CPU min s",
                  "peak RSS MB (max)", "peak x load+save"]


def program_rows(runs: dict[str, list[ProcessRun]]) -> list[list[str]]:
    """Table cells, ratios to load+save; a tool that failed in any run shows its failure."""
    def stats(tool):
        good = [r for r in runs[tool] if r.error is None]
        if len(good) < len(runs[tool]) or not good:
            return None
        walls = [r.wall for r in good]
        return min(walls), statistics.median(walls), min(r.cpu for r in good), max(r.peak_rss_mb for r in good)

    base = stats("load+save") if "load+save" in runs else None
    rows = []
    for tool in runs:
        figures = stats(tool)
        if figures is None:
            rows.append([tool, "FAILED: " + next(r.error for r in runs[tool] if r.error)])
            continue
        wall_min, wall_median, cpu_min, peak = figures
        rows.append([tool, f"{wall_min:.2f}", f"{wall_median:.2f}",
                     f"{wall_min / base[0]:.2f}" if base else "-", f"{cpu_min:.2f}", f"{peak:.0f}",
                     f"{peak / base[3]:.2f}" if base else "-"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for cells in rows:
        lines.append("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")
    return lines


def machine_note() -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (1/5/15 min) when the case ended"


def run_process_cases(args: argparse.Namespace, folder: str) -> list[str]:
    """The whole-program comparison of each case: prints each table, returns the markdown section."""
    section = [MARK_BEGIN, f"## {SECTION_TITLE}", "",
               "Each tool as a whole program in a fresh process, file to file: interpreter start, imports, "
               "load, optimize, save, as a user runs it (`graphfold IN -o OUT`). Runs are interleaved, the "
               "order rotating each round; on a shared machine the minimum is the figure to compare (median "
               "beside it), and CPU (user + system) is the steadier one. Peak RSS is the process's own "
               "high-water mark (VmHWM), the largest over the runs. graphfold runs with and without its "
               "validation; onnxsim (path to path, no check), onnxslim and onnxruntime's offline optimizer "
               "(ORT_ENABLE_EXTENDED, `optimized_model_filepath`) as their Python APIs run them. Rows marked "
               "(baseline) are graphfold from another checkout (`--baseline-repo`): before and after. graphfold "
               "can beat a plain load+save: it reads the weights in place through a memory map and streams "
               "them to the output, where load+save copies each into a protobuf message and serializes it "
               "(`graphfold/mapped.py`).", ""]
    for case in args.cases:
        src = os.path.join(folder, f"{case}.onnx")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build", case, src], check=True)
        size = os.path.getsize(src)
        progress = (lambda text: print(f"  {text}", file=sys.stderr, flush=True)) if args.verbose else None
        tools = ["load+save"] + args.tools
        if args.baseline_repo:
            tools += [t + BASELINE for t in args.tools if t.startswith("graphfold")]
        runs = compare_programs(src, folder, tools, args.repeats, args.graphfold_repo, args.timeout, progress,
                                args.baseline_repo)
        note = machine_note()
        print(f"\n{case}: {size / 2**20:.0f} MiB, {note}")
        rows = program_rows(runs)
        print(format_rows(PROCESS_HEADER, rows), flush=True)
        baseline = f" (baseline) is graphfold at {_commit(args.baseline_repo)}." if args.baseline_repo else ""
        section += [f"### {case}: {size / 2**20:.0f} MiB", "",
                    f"{args.repeats} runs per tool; {note}. Produced by `{args.command}`.{baseline}", ""]
        section += markdown_table(PROCESS_HEADER, rows) + [""]
        os.remove(src)
    return section + [MARK_END]


def _commit(repo: str) -> str:
    """The short commit a checkout is at, or its path when git cannot tell."""
    result = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else repo


MARK_BEGIN, MARK_END = "<!-- speed_benchmark: begin -->", "<!-- speed_benchmark: end -->"
# tools/peer_benchmark.py regenerates the page but keeps what lies between these: the section goes there.
KEPT = ("<!-- kept by peer_benchmark.py -->", "<!-- /kept by peer_benchmark.py -->")
SECTION_TITLE = "graphfold's own speed: whole runs against load+save and the peers"


def write_section(path: str, section: list[str]) -> None:
    """Replace this tool's marked section of ``path`` (new, it goes in the part peer_benchmark keeps);
    the rest of the page stays, and so do the cases of the old section that this run did not measure."""
    text = open(path).read() if os.path.exists(path) else ""
    old = text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0] if MARK_BEGIN in text and MARK_END in text else ""
    intro, cases = _case_blocks("\n".join(line for line in section if line not in (MARK_BEGIN, MARK_END)))
    _, old_cases = _case_blocks(old)
    merged = {**old_cases, **cases}
    order = [c for c in PROCESS_CASES if c in merged] + [c for c in merged if c not in PROCESS_CASES]
    block = "\n".join([MARK_BEGIN, intro.rstrip("\n"), ""] + [merged[c].rstrip("\n") + "\n" for c in order]
                      + [MARK_END])
    if old or MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    elif KEPT[1] in text:
        head, rest = text.split(KEPT[1], 1)
        text = head.rstrip("\n") + "\n\n" + block + "\n\n" + KEPT[1] + rest
    else:
        text = text.rstrip("\n") + "\n\n" + "\n\n".join([KEPT[0], block, KEPT[1]]) + "\n"
    with open(path, "w") as handle:
        handle.write(text)


def _case_blocks(section: str) -> tuple[str, dict[str, str]]:
    """A section's text before its first case, and each case's block keyed by the case name."""
    parts = section.split("\n### ")
    return parts[0], {part.split(":", 1)[0].strip(): "### " + part for part in parts[1:]}


def format_rows(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cells[i])) for cells in [header] + rows if i < len(cells) and len(cells) > 2)
              for i in range(len(header))]
    lines = []
    for cells in [header] + rows:
        if len(cells) == 2:  # a failure
            lines.append(f"{cells[0]:<{widths[0]}}  {cells[1]}")
            continue
        lines.append("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(PROCESS_CASES), default=list(PROCESS_CASES),
                        help="models for the whole-program comparison (default: all)")
    parser.add_argument("--tools", nargs="+", choices=list(PROGRAMS)[1:], default=list(PROGRAMS)[1:],
                        help="programs to run (load+save always runs, as the baseline)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per tool (default 5)")
    parser.add_argument("--graphfold-repo", default=REPO, metavar="DIR",
                        help="take graphfold from this checkout (to compare two versions; default this one)")
    parser.add_argument("--baseline-repo", metavar="DIR",
                        help="also run graphfold from this checkout, rows marked (baseline): before and after")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables into FILE's own section")
    parser.add_argument("--in-process", action="store_true",
                        help="the older in-process timing instead (imports not counted) on a ~100 MB ResNet")
    parser.add_argument("--big", action="store_true", help="the in-process timing with a > 2 GB model added")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per tool run")
    parser.add_argument("--keep", metavar="DIR", help="build models and outputs in DIR and keep them")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run as it ends")
    args = parser.parse_args(argv)
    args.command = " ".join(["python tools/speed_benchmark.py"] + [shlex.quote(a) for a in
                                                                   (sys.argv[1:] if argv is None else argv)])

    with tempfile.TemporaryDirectory(prefix="graphfold-speed-") as scratch:
        folder = args.keep or scratch
        os.makedirs(folder, exist_ok=True)
        if not (args.in_process or args.big):
            section = run_process_cases(args, folder)
            if args.markdown:
                write_section(args.markdown, section)
            return 0
        tools = [t for t in args.tools if t in OPTIMIZERS] or list(OPTIMIZERS)[1:]
        for name in ["resnet-100MB"] + (["resnet-2GB"] if args.big else []):
            size, records = run_speed_case(name, folder, tools, 1, args.timeout, keep=bool(args.keep))
            print(f"\n{name}: {size / 2**20:.0f} MiB on disk, {os.cpu_count()} CPUs")
            print(format_speed_table(records), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_repvgg(sys.argv[3], **PROCESS_CASES[sys.argv[2]])
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker":
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
