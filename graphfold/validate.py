"""Numerical equivalence of two models under onnxruntime.

Both models run with every onnxruntime graph optimization disabled, so the runtime's own
fusions cannot hide (or cause) a difference, on the same seeded random inputs (or the
user's real ones). For each output the error is max|y' - y|, and the relative error is
that over max|y|: the check passes when max|y' - y| <= atol + rtol * max|y|. Integer and
bool outputs must match exactly.

A check can pass without proving anything: a float output that is the same for every input
(a saturated softmax) or whose values all lie within ``WEAK_ATOL_FACTOR`` times the absolute
tolerance (a detector's 1e-6 scores on random inputs) would match a wrong model as well. Such
outputs are named as weak, measured on the outputs the comparison computes anyway.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from graphfold.errors import UsageError, first_line
from graphfold.inputs import make_inputs, real_inputs, shapes_text, ShapeMap, with_small_integers
from graphfold.io import session_source

log = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6
DEFAULT_SEEDS = (0, 1, 2)
# An output whose values all lie within this many times atol is checked to >= 10% of its size.
WEAK_ATOL_FACTOR = 10


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    scale: float
    passed: bool
    note: str = ""
    weak: str = ""  # why passing on this output proves little, if it does


@dataclass
class ValidationResult:
    passed: bool
    outputs: list[OutputError]
    inputs: list[dict[str, list[int]]]
    rtol: float
    atol: float
    source: str = "random"  # or "calibration"
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def weak_outputs(self) -> list[str]:
        return [o.name for o in self.outputs if o.weak]

    @property
    def weak(self) -> bool:
        return bool(self.weak_outputs)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(max_abs=self.max_abs, max_rel=self.max_rel, weak=self.weak, weak_outputs=self.weak_outputs)
        return out

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        worst = max(self.outputs, key=lambda o: o.max_rel, default=None)
        detail = f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
        if not self.passed and worst is not None:
            detail += f"; worst output {worst.name!r} {worst.note}".rstrip()
        return f"validation {verdict} on {len(self.inputs)} {self.source} input(s): {detail}"

    def weak_warning(self) -> str | None:
        """One line naming the outputs a check proves little on, and what to do; None when there are none."""
        weak = [o for o in self.outputs if o.weak]
        if not weak:
            return None
        listed = "; ".join(f"output {o.name!r} {o.weak}" for o in weak[:3]) + ("; ..." if len(weak) > 3 else "")
        return (f"warning: validation is weak, it would pass a wrong model too: {listed}. Validate on "
                "real inputs with --calibration FILE.npz, or choose them with --input-shape/--input-value")


class Runner:
    """An onnxruntime session over a model, with optimizations off."""

    def __init__(self, model: onnx.ModelProto, what: str, path: str | None = None) -> None:
        """``path``: the file ``model`` was loaded from, if any; onnxruntime then reads it itself
        rather than a serialized copy (one copy of the model less, in time and memory)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Idle worker threads would spin between ops: on a busy machine that is CPU taken from
        # everyone (validation used twice the CPU time) for no gain in wall time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Fatal only: a failing run raises, and the error becomes one line of ours; onnxruntime's
        # own log would add more lines on stderr.
        options.log_severity_level = 4
        # The folder lives as long as the session, which may read external data from it.
        folder = tempfile.mkdtemp(prefix="graphfold-validate-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        try:
            source = path if path is not None else session_source(model, folder)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UsageError(f"onnxruntime cannot run the {what} model: {first_line(exc)}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, object]:
        names = {i.name for i in self.session.get_inputs()}
        return dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feeds.items() if k in names})))


def compare_outputs(name: str, ref: object, out: object, rtol: float, atol: float) -> OutputError:
    """Compare one output pair: tensors, or sequences of them (element by element, worst kept)."""
    if isinstance(ref, (list, tuple)) or ref is None:
        return _compare_sequences(name, ref, out, rtol, atol)
    try:
        ref_arr, out_arr = np.asarray(ref), np.asarray(out)
    except Exception:
        return OutputError(name, 0.0, 0.0, 0.0, True, "not a tensor; not compared")
    if ref_arr.shape != out_arr.shape:
        return OutputError(name, float("inf"), float("inf"), 0.0, False,
                           f"shape {list(out_arr.shape)} != {list(ref_arr.shape)}")
    if ref_arr.dtype != out_arr.dtype:
        return OutputError(name, float("inf"), float("inf"), 0.0, False,
                           f"dtype {out_arr.dtype} != {ref_arr.dtype}")
    if ref_arr.size == 0:
        return OutputError(name, 0.0, 0.0, 0.0, True)
    if not np.issubdtype(ref_arr.dtype, np.floating):
        if ref_arr.dtype == object:
            return OutputError(name, 0.0, 0.0, 0.0, True, "not a numeric tensor; not compared")
        mismatched = int(np.count_nonzero(ref_arr != out_arr))
        return OutputError(name, float(mismatched), float(mismatched) / ref_arr.size, 0.0, mismatched == 0,
                           f"{mismatched} of {ref_arr.size} elements differ" if mismatched else "")
    ref64, out64 = ref_arr.astype(np.float64), out_arr.astype(np.float64)
    # NaN and inf where the original has them, at the same places, count as equal.
    same_special = (np.isnan(ref64) & np.isnan(out64)) | ((ref64 == out64) & np.isinf(ref64))
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, which the next line counts as inf
        diff = np.where(same_special, 0.0, np.abs(out64 - ref64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = ref64[np.isfinite(ref64)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    max_abs = float(np.max(diff))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = max_abs <= atol + rtol * scale
    return OutputError(name, max_abs, max_rel, scale, passed)


def _compare_sequences(name: str, ref: object, out: object, rtol: float, atol: float) -> OutputError:
    if ref is None or out is None:
        same = ref is None and out is None
        return OutputError(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 0.0, same,
                           "" if same else "one optional output is empty")
    if not isinstance(out, (list, tuple)) or len(out) != len(ref):
        return OutputError(name, float("inf"), float("inf"), 0.0, False, "sequence lengths differ")
    errors = [compare_outputs(name, r, o, rtol, atol) for r, o in zip(ref, out)]
    return max(errors, key=lambda e: (not e.passed, e.max_rel), default=OutputError(name, 0.0, 0.0, 0.0, True))


def dtype_rtol(model: onnx.ModelProto, rtol: float) -> float:
    """Loosen ``rtol`` for float16 outputs, whose rounding alone exceeds float32's tolerance."""
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if any(o.type.tensor_type.elem_type in half for o in model.graph.output):
        return max(rtol, 1e-2)
    return rtol


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, *,
                   input_shapes: ShapeMap | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
                   feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
                   rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                   progress: Callable[[str], None] | None = None,
                   input_values: Mapping[str, np.ndarray] | None = None,
                   reference_path: str | None = None, candidate_path: str | None = None) -> ValidationResult:
    """Run both models on the same inputs and compare every output: ``feeds``, else seeded
    random ones with ``input_values`` (fitted by ``inputs.fit_input_values``) for their inputs.
    ``reference_path``, ``candidate_path``: the files the models were loaded from or saved to,
    which onnxruntime then reads (the models' own weights need not be in the messages)."""
    rtol = dtype_rtol(reference, rtol)
    ref_runner = Runner(reference, "original", reference_path)
    try:
        cand_runner = Runner(candidate, "optimized", candidate_path)
    except UsageError as exc:
        # The original loads, so a result that does not is a failed result, not bad input.
        return ValidationResult(False, [OutputError("*", float("inf"), float("inf"), 0.0, False, str(exc))], [],
                                rtol, atol)
    missing = set(ref_runner.output_names) - set(cand_runner.output_names)
    if missing:
        return ValidationResult(False, [OutputError(n, float("inf"), float("inf"), 0.0, False, "missing")
                                        for n in sorted(missing)], [], rtol, atol)
    source = "calibration" if feeds is not None else "random"
    batches = list(feeds) if feeds is not None else list(_random_feeds(reference, input_shapes, seeds, input_values))
    worst: dict[str, OutputError] = {}
    spreads = _Spreads()
    used, notes = [], []
    for index, batch in enumerate(batches, 1):
        if progress:
            progress(f"validating {index}/{len(batches)}")
        used.append({k: list(np.shape(v)) for k, v in batch.items()})
        try:
            ref_out = ref_runner.run(batch)
        except Exception as exc:
            small = with_small_integers(batch, index, keep=input_values or {}) if feeds is None else None
            if small is None:
                _cannot_run_original(exc, used[-1])
            # Integers over their whole dtype can be out of range as indices or sizes.
            notes.append("the original cannot run on integer inputs spanning their dtype; "
                         "compared on small non-negative integers instead (--input-value sets real values)")
            batch = small
            try:
                ref_out = ref_runner.run(batch)
            except Exception as again:
                _cannot_run_original(again, used[-1])
        try:
            cand_out = cand_runner.run(batch)
        except Exception as exc:
            return ValidationResult(False, [OutputError("*", float("inf"), float("inf"), 0.0, False,
                                                        f"optimized model failed to run: {first_line(exc)}")],
                                    used, rtol, atol, source)
        for name in ref_runner.output_names:
            err = compare_outputs(name, ref_out[name], cand_out[name], rtol, atol)
            prev = worst.get(name, err)
            # Keep each output's worst case: a failure outranks any pass, then the larger error.
            worst[name] = max(prev, err, key=lambda e: (not e.passed, e.max_rel))
            spreads.add(name, ref_out[name])
    outputs = [worst[n] for n in ref_runner.output_names if n in worst]
    for output in outputs:
        output.weak = spreads.weakness(output.name, rtol, atol)
    return ValidationResult(all(o.passed for o in outputs), outputs, used, rtol, atol, source,
                            list(dict.fromkeys(notes)))


def _cannot_run_original(exc: Exception, shapes: Mapping[str, list[int]]) -> None:
    # The original failing is the input's fault (or the given shapes'), not graphfold's.
    raise UsageError(f"onnxruntime cannot run the original model on inputs {shapes_text(shapes)} "
                     f"(choose them with --input-shape, or give values with --input-value NAME:VALUE): "
                     f"{first_line(exc)}") from None


class _Spreads:
    """Per float output of the original: its largest |value| and how far it moves from the first
    input's result over the inputs of the same shape, to tell a check that proves little."""

    def __init__(self) -> None:
        self.first: dict[str, np.ndarray] = {}
        self.scale: dict[str, float] = {}
        self.spread: dict[str, float] = {}  # only for outputs seen at least twice at one shape

    def add(self, name: str, value: object) -> None:
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size == 0:
            return
        finite = np.abs(value[np.isfinite(value)])
        self.scale[name] = max(self.scale.get(name, 0.0), float(finite.max()) if finite.size else 0.0)
        first = self.first.setdefault(name, value)
        if first is value or first.shape != value.shape:
            return
        with np.errstate(invalid="ignore", over="ignore"):
            moved = np.abs(value.astype(np.float64) - first)
        moved = np.where(np.isnan(first) & np.isnan(value), 0.0, moved)
        self.spread[name] = max(self.spread.get(name, 0.0), float(np.nan_to_num(moved, nan=np.inf).max()))

    def weakness(self, name: str, rtol: float, atol: float) -> str:
        scale = self.scale.get(name)
        if scale is None:
            return ""
        if scale <= WEAK_ATOL_FACTOR * atol:
            return (f"is all within {WEAK_ATOL_FACTOR}x the absolute tolerance (max |y| {scale:.3g}, "
                    f"atol {atol:.3g})" if scale > 0 else "is all zeros")
        spread = self.spread.get(name)
        if spread is not None and spread <= atol + rtol * scale:
            return "is the same for every validation input"
        return ""


def _random_feeds(model: onnx.ModelProto, input_shapes: ShapeMap | None, seeds: Sequence[int],
                  values: Mapping[str, np.ndarray] | None = None):
    """Seeded inputs at batch 1; with a symbolic batch dim the last seed runs at batch 2 too,
    unless the user chose the batch of some input (its shape or its value)."""
    chosen = set(input_shapes or {}) | set(values or {})
    symbolic = [vi.name for vi in real_inputs(model.graph)
                if vi.type.tensor_type.shape.dim and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")]
    symbolic_batch = bool(symbolic) and not chosen & set(symbolic)
    for i, seed in enumerate(seeds):
        batch = 2 if symbolic_batch and i == len(seeds) - 1 else None
        yield make_inputs(model, input_shapes, seed=seed, batch=batch, values=values, full_integers=True)
