"""Latency of several ONNX models under onnxruntime, measured so they can be compared.

Every model gets its own InferenceSession with the same settings and is fed the same seeded
inputs. After a warm-up, the models are timed in interleaved rounds: each round times every
model once (one sample = the mean of ``repeat`` runs) and the order is rotated from round to
round, so slow drift of the machine (clock boost, thermal throttling, other load) spreads over
all models instead of biasing whichever ran last. The median across rounds is the figure to
compare; p10/p90 show the spread. ``ratio`` is each model's median over the first model's, so
passing the original model first gives "optimized / original" directly.
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
from graphfold.inputs import make_inputs, real_inputs, resolve_shapes

log = logging.getLogger(__name__)

ModelSource = Union[str, "os.PathLike[str]", onnx.ModelProto]

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = ("cpu", "cuda", "auto")


@dataclass
class ModelTiming:
    """Latency of one model, in milliseconds per inference call."""

    path: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: list[float]
    ratio: float  # median / the first model's median


@dataclass
class BenchResult:
    """Timings of every benchmarked model and the settings they were measured under."""

    timings: list[ModelTiming]
    provider: str
    threads: int
    batch: int | None
    rounds: int
    input_shapes: dict[str, list[int]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        shapes = ", ".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in self.input_shapes.items())
        header = (f"onnxruntime {self.provider}, {self.threads} thread(s), {self.rounds} rounds, "
                  f"inputs {shapes or '(none)'}")
        width = max([len("model")] + [len(t.path) for t in self.timings])
        lines = [header,
                 f"{'model':<{width}}  {'median ms':>10}  {'p10-p90 ms':>19}  {'ratio':>6}"]
        for t in self.timings:
            spread = f"{t.p10_ms:.3f}-{t.p90_ms:.3f}"
            lines.append(f"{t.path:<{width}}  {t.median_ms:>10.3f}  {spread:>19}  {t.ratio:>6.3f}")
        return "\n".join(lines)


def bench(models: Sequence[ModelSource], *, threads: int = 1, batch: int | None = None,
          input_shapes: Mapping[str, Sequence[int]] | None = None, provider: str = "cpu",
          rounds: int = 20, warmup: int = 5, repeat: int = 10, opt_level: str = "all",
          progress: Callable[[int, int], None] | None = None) -> BenchResult:
    """Time ``models`` under onnxruntime with identical settings and inputs.

    ``warmup`` untimed runs per model (at least one is always made, to catch inputs the model
    refuses) precede the timed rounds; ``progress(done, total)`` is called after each round. On CUDA the times include
    copying the inputs to the device and the outputs back, as a plain ``session.run`` does.
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
        feeds = make_inputs(graphs[0], input_shapes, seed=0, batch=batch)
        shapes = resolve_shapes(graphs[0], input_shapes, batch)
        options = _session_options(threads, opt_level)
        sessions = [_session(label, source, options, providers) for label, source in zip(labels, sources)]

        for label, session in zip(labels, sessions):
            _warm_up(label, session, feeds, warmup)
        samples = _timed_rounds(sessions, feeds, rounds, repeat, progress)

    medians = [float(np.median(s)) for s in samples]
    timings = [ModelTiming(path=label, median_ms=median,
                           p10_ms=float(np.percentile(s, 10)), p90_ms=float(np.percentile(s, 90)),
                           samples_ms=[float(x) for x in s], ratio=median / medians[0])
               for label, s, median in zip(labels, samples, medians)]
    resolved = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    return BenchResult(timings=timings, provider=resolved, threads=threads, batch=batch,
                       rounds=rounds, input_shapes=shapes)


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
                  repeat: int, progress: Callable[[int, int], None] | None) -> list[list[float]]:
    samples: list[list[float]] = [[] for _ in sessions]
    count = len(sessions)
    for round_index in range(rounds):
        for offset in range(count):
            which = (round_index + offset) % count
            session = sessions[which]
            start = time.perf_counter()
            for _ in range(repeat):
                session.run(None, feeds)
            samples[which].append((time.perf_counter() - start) * 1000.0 / repeat)
        if progress is not None:
            progress(round_index + 1, rounds)
    return samples


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
