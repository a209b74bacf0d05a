"""Latency of several ONNX models under onnxruntime, measured so they can be compared.

Every model gets its own InferenceSession with the same settings and is fed the same seeded
inputs. After a warm-up, the models are timed in interleaved rounds: each round times every
model once (one sample = the mean of ``repeat`` runs) and the order is rotated from round to
round, so slow drift of the machine (clock boost, thermal throttling, other load) spreads over
all models instead of biasing whichever ran last. The median across rounds is the figure to
compare; p10/p90 show the spread. ``ratio`` is each model's median over the first model's, so
passing the original model first gives "optimized / original" directly.

On a loaded machine wall-clock time also counts the time other processes held the core. So
each sample also records the CPU time this process spent (``time.process_time``): with one
intra-op thread onnxruntime computes on the calling thread, and that CPU time is the work
itself, whatever else runs. ``cpu_ratio`` compares it like ``ratio`` (1-thread runs only;
with more threads CPU time adds up over cores and is not latency). When a model's p90/p10
spread exceeds ``SPREAD_LIMIT`` the result carries a warning: its medians are not to be trusted,
and the minimum and the CPU-time ratio are the better guides. Ratios within ``TIE`` of 1 are
ties: machine noise, not a difference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from graphfold import io as model_io
from graphfold.errors import UsageError, first_line
from graphfold.inputs import fit_input_values, make_inputs, real_inputs, resolve_shapes, shapes_text, value_shapes

log = logging.getLogger(__name__)

ModelSource = Union[str, "os.PathLike[str]", onnx.ModelProto]

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = ("cpu", "cuda", "auto")
SPREAD_LIMIT = 1.2  # p90 / p10 beyond this: the timings moved too much to trust the medians
TIE = 0.05  # ratios within 5% of 1 are ties

# The clocks, module attributes so tests can make a machine as noisy as they like.
wall_clock = time.perf_counter
cpu_clock = time.process_time


@dataclass
class ModelTiming:
    """Latency of one model, in milliseconds per inference call."""

    path: str
    median_ms: float
    min_ms: float
    p10_ms: float
    p90_ms: float
    spread: float  # p90 / p10
    samples_ms: list[float]
    ratio: float  # median / the first model's median
    cpu_ms: float  # median process CPU time per call
    cpu_ratio: float | None  # cpu_ms / the first model's; None unless 1 thread
    verdict: str  # "baseline", "tie", "faster" or "slower" (by cpu_ratio when there is one)


@dataclass
class BenchResult:
    """Timings of every benchmarked model and the settings they were measured under."""

    timings: list[ModelTiming]
    provider: str
    threads: int
    batch: int | None
    rounds: int
    input_shapes: dict[str, list[int]]
    spread_limit: float = SPREAD_LIMIT
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        shapes = shapes_text(self.input_shapes)
        header = (f"onnxruntime {self.provider}, {self.threads} thread(s), {self.rounds} rounds, "
                  f"inputs {shapes or '(none)'}")
        width = max([len("model")] + [len(t.path) for t in self.timings])
        lines = [header,
                 f"{'model':<{width}}  {'min ms':>9}  {'median ms':>10}  {'p10-p90 ms':>19}  {'spread':>6}  "
                 f"{'ratio':>6}  {'cpu ratio':>9}  verdict"]
        for t in self.timings:
            spread = f"{t.p10_ms:.3f}-{t.p90_ms:.3f}"
            cpu = "-" if t.cpu_ratio is None else f"{t.cpu_ratio:.3f}"
            lines.append(f"{t.path:<{width}}  {t.min_ms:>9.3f}  {t.median_ms:>10.3f}  {spread:>19}  "
                         f"{t.spread:>6.2f}  {t.ratio:>6.3f}  {cpu:>9}  {t.verdict}")
        basis = "CPU time" if self.threads == 1 else "median"
        lines.append(f"verdict by {basis} ratio; within {TIE:.0%} of 1 is a tie")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def bench(models: Sequence[ModelSource], *, threads: int = 1, batch: int | None = None,
          input_shapes: Mapping[str, Sequence[int]] | None = None, provider: str = "cpu",
          rounds: int = 20, warmup: int = 5, repeat: int = 10, opt_level: str = "all",
          progress: Callable[[int, int], None] | None = None,
          input_values: Mapping[str, object] | None = None) -> BenchResult:
    """Time ``models`` under onnxruntime with identical settings and inputs.

    ``warmup`` untimed runs per model (at least one is always made, to catch inputs the model
    refuses) precede the timed rounds; ``progress(done, total)`` is called after each round.
    ``input_values`` feeds fixed values (arrays or numbers by input name) instead of random data.
    On CUDA the times include copying the inputs to the device and the outputs back, as a plain
    ``session.run`` does.
    """
    if not models:
        raise UsageError("bench needs at least one model")
    for name, value, least in (("threads", threads, 1), ("rounds", rounds, 1),
                               ("repeat", repeat, 1), ("warmup", warmup, 0)):
        if value < least:
            raise UsageError(f"{name} must be >= {least}, got {value}")
    if opt_level not in OPT_LEVELS:
        raise UsageError(f"unknown opt level {opt_level!r}; choose from {', '.join(OPT_LEVELS)}")
    providers = _providers(provider)

    with contextlib.ExitStack() as stack:
        labels, sources, graphs = [], [], []
        for index, model in enumerate(models):
            label, source, graph_model = _prepare(model, index, stack)
            labels.append(label)
            sources.append(source)
            graphs.append(graph_model)
        _check_same_inputs(labels, graphs)
        values = fit_input_values(graphs[0], input_values, input_shapes)
        input_shapes = value_shapes(values, input_shapes)
        feeds = make_inputs(graphs[0], input_shapes, seed=0, batch=batch, values=values)
        shapes = resolve_shapes(graphs[0], input_shapes, batch)
        options = _session_options(threads, opt_level)
        sessions = [_session(label, source, options, providers) for label, source in zip(labels, sources)]

        for label, session in zip(labels, sessions):
            _warm_up(label, session, feeds, warmup)
        samples, cpu_samples = _timed_rounds(sessions, feeds, rounds, repeat, progress)

    resolved = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    # On CUDA the host thread mostly waits: its CPU time says nothing about the work.
    timings = _timings(labels, samples, cpu_samples, single_thread=threads == 1 and resolved == "cpu")
    return BenchResult(timings=timings, provider=resolved, threads=threads, batch=batch,
                       rounds=rounds, input_shapes=shapes, warnings=_warnings(timings))


def _timings(labels: list[str], samples: list[list[float]], cpu_samples: list[list[float]],
             single_thread: bool) -> list[ModelTiming]:
    medians = [float(np.median(s)) for s in samples]
    cpu_medians = [float(np.median(c)) for c in cpu_samples]
    timings = []
    for index, (label, s) in enumerate(zip(labels, samples)):
        p10, p90 = float(np.percentile(s, 10)), float(np.percentile(s, 90))
        ratio = medians[index] / medians[0]
        # A CPU clock too coarse to see a run (0 ms) gives no ratio rather than a division by zero.
        cpu_ratio = cpu_medians[index] / cpu_medians[0] if single_thread and cpu_medians[0] > 0 else None
        timings.append(ModelTiming(
            path=label, median_ms=medians[index], min_ms=float(np.min(s)), p10_ms=p10, p90_ms=p90,
            spread=p90 / p10 if p10 > 0 else float("inf"), samples_ms=[float(x) for x in s], ratio=ratio,
            cpu_ms=cpu_medians[index], cpu_ratio=cpu_ratio,
            verdict="baseline" if index == 0 else _verdict(cpu_ratio if cpu_ratio is not None else ratio)))
    return timings


def _verdict(ratio: float) -> str:
    if abs(ratio - 1) <= TIE:
        return "tie"
    return "faster" if ratio < 1 else "slower"


def _warnings(timings: list[ModelTiming]) -> list[str]:
    wide = [t for t in timings if t.spread > SPREAD_LIMIT]
    if not wide:
        return []
    named = ", ".join(f"{t.path} {t.spread:.2f}" for t in wide)
    return [f"spread too wide to trust the medians (p90/p10 over {SPREAD_LIMIT}: {named}); the machine is "
            "busy or the runs too short: compare min and CPU-time ratio, or rerun with more rounds"]


def _warm_up(label: str, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
             warmup: int) -> None:
    try:  # the first run is where a wrong --input-shape or dtype surfaces
        session.run(None, feeds)
    except Exception as exc:
        shapes = {name: list(array.shape) for name, array in feeds.items()}
        raise UsageError(f"onnxruntime cannot run {label} on inputs {shapes}: {first_line(exc)}") from exc
    for _ in range(warmup - 1):
        session.run(None, feeds)


def _timed_rounds(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], rounds: int,
                  repeat: int, progress: Callable[[int, int], None] | None
                  ) -> tuple[list[list[float]], list[list[float]]]:
    """Per model, wall-clock and process CPU milliseconds per call, one sample per round."""
    samples: list[list[float]] = [[] for _ in sessions]
    cpu_samples: list[list[float]] = [[] for _ in sessions]
    count = len(sessions)
    for round_index in range(rounds):
        for offset in range(count):
            which = (round_index + offset) % count
            session = sessions[which]
            cpu_start, start = cpu_clock(), wall_clock()
            for _ in range(repeat):
                session.run(None, feeds)
            wall, cpu = wall_clock() - start, cpu_clock() - cpu_start
            samples[which].append(wall * 1000.0 / repeat)
            cpu_samples[which].append(cpu * 1000.0 / repeat)
        if progress is not None:
            progress(round_index + 1, rounds)
    return samples, cpu_samples


def _providers(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise UsageError("provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu)")
    if provider in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_options(threads: int, opt_level: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    # Fatal only: a failure raises and becomes one line of ours; onnxruntime would print its own too.
    options.log_severity_level = 4
    return options


def _session(label: str, source: str | bytes, options: ort.SessionOptions,
             providers: list[str]) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise UsageError(f"onnxruntime cannot load {label}: {first_line(exc)}") from exc
    if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != providers[0]:
        raise UsageError(f"onnxruntime could not place {label} on CUDA (got {session.get_providers()})")
    return session


def _prepare(model: ModelSource, index: int,
             stack: contextlib.ExitStack) -> tuple[str, str | bytes, onnx.ModelProto]:
    """A label, what InferenceSession should load, and the graph (weights not needed) for inputs."""
    if isinstance(model, onnx.ModelProto):
        label = f"model[{index}]" + (f" {model.graph.name}" if model.graph.name else "")
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="graphfold-bench-"))
        source = model_io.session_source(model, folder)
        if isinstance(source, str):
            log.info("%s cannot be one protobuf message; saved it with external data to %s", label, folder)
        return label, source, model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise UsageError(f"no such model file: {path}")
    try:
        graph_model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UsageError(f"cannot read {path} as an ONNX model: {first_line(exc)}") from exc
    return path, path, graph_model


def _check_same_inputs(labels: list[str], graphs: list[onnx.ModelProto]) -> None:
    expected = sorted(vi.name for vi in real_inputs(graphs[0].graph))
    for label, graph_model in zip(labels[1:], graphs[1:]):
        names = sorted(vi.name for vi in real_inputs(graph_model.graph))
        if names != expected:
            raise UsageError(f"{label} has inputs {names}, but {labels[0]} has {expected}; "
                             "bench compares models with the same input names")


def plot_backend():
    """matplotlib's Figure, or a ``UsageError`` saying how to install it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'graphfold[plot]'") from None
    return Figure


def plot(result: BenchResult, path: str) -> None:
    """Bar chart of median latency per model (p10-p90 whiskers, ratio on each bar) as a PNG."""
    Figure = plot_backend()
    names = [os.path.basename(t.path) or t.path for t in result.timings]
    medians = [t.median_ms for t in result.timings]
    errors = [[t.median_ms - t.p10_ms for t in result.timings],
              [t.p90_ms - t.median_ms for t in result.timings]]
    figure = Figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 4.0), layout="constrained")
    axes = figure.add_subplot()
    bars = axes.bar(range(len(names)), medians, yerr=errors, capsize=4, color="#4c72b0")
    axes.bar_label(bars, labels=[f"{t.ratio:.2f}x" for t in result.timings], padding=3)
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("median latency (ms)")
    axes.set_title(f"onnxruntime {result.provider}, {result.threads} thread(s), {result.rounds} rounds")
    axes.margins(y=0.15)
    figure.savefig(path, dpi=120)
