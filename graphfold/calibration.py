"""Calibration data: the inputs approximate rewrites are measured on.

A ``.npz`` holds one array per run-time graph input, keyed by the input's name, samples on the
first axis; an optional ``labels`` array (or a separate ``.npy``) holds one class per sample, for
top-1 accuracy before and after. A model with a single input may take a plain ``.npy``. Without
a file, seeded random inputs stand in, and every decision made on them is weaker: an
approximation that is harmless on N(0, 1) noise need not be harmless on real data.

Batches are cut from the arrays in order and at a fixed size (the model's own batch dim where it
fixes one), so every measurement of one run sees exactly the same batches.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from graphfold.errors import UsageError, first_line
from graphfold.inputs import ShapeMap, random_array, real_inputs, resolve_shape

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16
RANDOM_SAMPLES = 32
LABELS_KEY = "labels"

CalibrationSource = Union[str, os.PathLike, Mapping[str, np.ndarray], None]


@dataclass
class Calibration:
    """Inputs keyed by graph input name (first axis = samples), optional labels, batching."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str  # the file, "arrays" for data given in memory, or "random"
    batch_size: int
    notes: list[str] = field(default_factory=list)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # --input-value inputs, fed whole to every batch

    @property
    def samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def batches(self, samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples in order, covering the first ``samples`` (all by default)."""
        total = self.samples if samples is None else min(samples, self.samples)
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            yield {**{name: array[start:stop] for name, array in self.arrays.items()}, **self.fixed}

    def label_batches(self) -> Iterator[np.ndarray]:
        if self.labels is None:
            return
        for start in range(0, self.samples, self.batch_size):
            yield self.labels[start:start + self.batch_size]

    def info(self) -> dict:
        """What the report shows about the data the decisions were made on."""
        return {
            "source": self.source,
            "random": self.is_random,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "inputs": {name: list(array.shape) for name, array in self.arrays.items()},
            "input_values": {name: list(array.shape) for name, array in self.fixed.items()},
            "labels": self.labels is not None,
            "notes": list(self.notes),
        }


def load_calibration(source: CalibrationSource, model: onnx.ModelProto, *,
                     labels: str | os.PathLike | np.ndarray | None = None,
                     input_shapes: ShapeMap | None = None, batch_size: int | None = None,
                     random_samples: int = RANDOM_SAMPLES, seed: int = 0,
                     input_values: Mapping[str, np.ndarray] | None = None) -> Calibration:
    """Calibration data for ``model``: from a file or arrays, else seeded random inputs.
    ``input_values`` (fitted by ``inputs.fit_input_values``) serve the inputs the data lacks.

    Raises ``UsageError`` with one readable line for a missing or unreadable file, an input the
    data lacks, arrays of the wrong rank, dims, dtype or sample count, or unusable labels.
    """
    values = dict(input_values or {})
    inputs = real_inputs(model.graph)
    if not inputs:
        raise UsageError("the model has no run-time inputs to calibrate")
    if source is None:
        if labels is not None:
            raise UsageError("--labels needs --calibration: labels for random inputs mean nothing")
        return _random(model, input_shapes, batch_size, random_samples, seed, values)
    what, arrays = _read(source, [vi.name for vi in inputs])
    notes: list[str] = []
    label_values = arrays.pop(LABELS_KEY, None) if LABELS_KEY not in {vi.name for vi in inputs} else None
    if labels is not None:
        label_values = _read_labels(labels)
    missing = [vi.name for vi in inputs if vi.name not in arrays and vi.name not in values]
    if missing or not set(arrays) & {vi.name for vi in inputs}:
        name = missing[0] if missing else inputs[0].name
        keys = ", ".join(sorted(arrays)) or "none"
        raise UsageError(f"{what}: no array for graph input {name!r} (arrays: {keys}; "
                         f"inputs: {', '.join(vi.name for vi in inputs)}); an input the data cannot hold "
                         f"takes a fixed value with --input-value {name}:VALUE")
    extra = sorted(set(arrays) - {vi.name for vi in inputs})
    if extra:
        notes.append(f"ignored arrays that are not graph inputs: {', '.join(extra)}")
    checked = {vi.name: _checked_array(what, vi, arrays[vi.name], input_shapes, notes)
               for vi in inputs if vi.name in arrays}
    counts = {name: array.shape[0] for name, array in checked.items()}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise UsageError(f"{what}: inputs have different sample counts ({listed})")
    given = _given_values([vi for vi in inputs if vi.name not in arrays], values, input_shapes, checked)
    if label_values is not None:
        label_values = _checked_labels(what, label_values, next(iter(checked.values())).shape[0], notes)
    size, fixed = _batch_size(inputs, batch_size)
    if fixed:
        checked = _whole_batches(what, checked, size, notes)
        if label_values is not None:
            label_values = label_values[:next(iter(checked.values())).shape[0]]
    return Calibration(checked, label_values, what, size, notes, given)


def _given_values(inputs: Sequence[onnx.ValueInfoProto], values: Mapping[str, np.ndarray],
                  input_shapes: ShapeMap | None, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``--input-value`` inputs: a scalar filling a tensor input joins ``arrays`` as one sample
    array (the samples counted from ``arrays``); any other value is returned, fed whole to every batch."""
    samples = next(iter(arrays.values())).shape[0]
    whole = {}
    for vi in inputs:
        value = values[vi.name]
        if value.ndim == 0 and vi.type.tensor_type.shape.dim:
            arrays[vi.name] = np.full([samples, *resolve_shape(vi, input_shapes)[1:]], value)
        else:
            whole[vi.name] = value
    return whole


def _read(source: CalibrationSource, names: Sequence[str]) -> tuple[str, dict[str, np.ndarray]]:
    if isinstance(source, Mapping):
        return "calibration arrays", {str(k): np.asarray(v) for k, v in source.items()}
    path = os.fspath(source)
    loaded = _load(path, "calibration")
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise UsageError(f"{path}: a plain .npy serves a single-input model only; this one has "
                             f"{len(names)} inputs, so give a .npz keyed by input name")
        return path, {names[0]: loaded}
    with loaded:
        try:
            return path, {key: loaded[key] for key in loaded.files}
        except Exception as exc:
            raise UsageError(f"{path}: cannot read its arrays ({first_line(exc)})") from None


def _load(path: str, what: str):
    """``np.load`` of a file (no pickles): an array, or an open NpzFile."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: {what} file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"{path}: not a .npz/.npy file numpy can read ({first_line(exc)})") from None


def _read_labels(labels: str | os.PathLike | np.ndarray) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    path = os.fspath(labels)
    loaded = _load(path, "labels")
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        if LABELS_KEY in loaded.files or len(loaded.files) == 1:
            return loaded[LABELS_KEY if LABELS_KEY in loaded.files else loaded.files[0]]
    raise UsageError(f"{path}: a .npz of labels needs a single array or one named {LABELS_KEY!r}")


def _checked_array(what: str, vi: onnx.ValueInfoProto, array: np.ndarray, input_shapes: ShapeMap | None,
                   notes: list[str]) -> np.ndarray:
    """``array`` as the input takes it: rank, fixed dims (and given --input-shape dims), dtype."""
    name, tensor_type = vi.name, vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    if array.ndim == 0:
        raise UsageError(f"{what}: array {name!r} is a scalar; the first axis must count samples")
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if len(dims) == 0:
            raise UsageError(f"{what}: graph input {name!r} is a scalar and cannot be fed samples; "
                             f"leave it out and give it with --input-value {name}:VALUE")
        if array.ndim != len(dims):
            raise UsageError(f"{what}: array {name!r} has shape {list(array.shape)} (rank {array.ndim}), "
                             f"but the input has rank {len(dims)}: [samples, {_dims_text(dims[1:])}]")
        given = list(input_shapes[name]) if input_shapes and name in input_shapes else None
        for axis in range(1, len(dims)):
            fixed = dims[axis].dim_value if dims[axis].HasField("dim_value") and dims[axis].dim_value > 0 else None
            fixed = given[axis] if fixed is None and given else fixed
            if fixed is not None and array.shape[axis] != fixed:
                raise UsageError(f"{what}: array {name!r} has shape {list(array.shape)}, but the input's dim "
                                 f"{axis} is {fixed}: expected [samples, {_dims_text(dims[1:])}]")
    if array.shape[0] == 0:
        raise UsageError(f"{what}: array {name!r} holds no samples")
    if array.dtype != dtype:
        # Only within a kind: integer pixels fed to a float input usually mean missing preprocessing.
        if array.dtype.kind != dtype.kind or not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise UsageError(f"{what}: array {name!r} is {array.dtype.name}, the input takes {dtype.name}")
        notes.append(f"{name}: converted {array.dtype.name} to {dtype.name}")
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def _batch_size(inputs: Sequence[onnx.ValueInfoProto], requested: int | None) -> tuple[int, bool]:
    """The model's fixed batch dim where it has one (and True), else ``requested`` or ``DEFAULT_BATCH``."""
    fixed = set()
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed.add(int(dims[0].dim_value))
    if len(fixed) > 1:
        raise UsageError(f"the model's inputs fix different batch sizes ({sorted(fixed)}); "
                         "graphfold cannot cut calibration batches for it")
    if fixed:
        return fixed.pop(), True
    if requested is not None and requested < 1:
        raise UsageError(f"calibration batch size must be at least 1, got {requested}")
    return requested or DEFAULT_BATCH, False


def _whole_batches(what: str, arrays: dict[str, np.ndarray], size: int, notes: list[str]) -> dict[str, np.ndarray]:
    """Drop a last partial batch: the model fixes its batch dim, so it cannot run one."""
    count = next(iter(arrays.values())).shape[0]
    keep = count - count % size
    if keep == count:
        return arrays
    if keep == 0:
        raise UsageError(f"{what}: {count} samples, but the model's batch dim is fixed at {size}")
    notes.append(f"dropped the last {count - keep} samples: the model's batch dim is fixed at {size}")
    return {name: array[:keep] for name, array in arrays.items()}


def _checked_labels(what: str, labels: np.ndarray, samples: int, notes: list[str]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        notes.append("labels are one-hot (or scores); using their argmax as the class")
        labels = labels.argmax(axis=1)
    elif labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UsageError(f"{what}: labels must be one class per sample, shape [samples], got {list(labels.shape)}")
    if labels.shape[0] != samples:
        raise UsageError(f"{what}: {labels.shape[0]} labels for {samples} samples: one label per sample, "
                         "in the same order")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise UsageError(f"{what}: labels must be integer classes")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{what}: labels must be integer classes, got {labels.dtype.name}")
    return labels.astype(np.int64)


def _random(model: onnx.ModelProto, input_shapes: ShapeMap | None, batch_size: int | None,
            samples: int, seed: int, values: Mapping[str, np.ndarray]) -> Calibration:
    inputs = real_inputs(model.graph)
    size, _ = _batch_size(inputs, batch_size)
    samples = max(samples - samples % size, size)
    rng = np.random.default_rng(seed)
    arrays = {}
    for vi in inputs:
        if vi.name in values:
            continue
        shape = resolve_shape(vi, input_shapes)
        arrays[vi.name] = random_array(vi.type.tensor_type.elem_type, [samples, *shape[1:]], rng)
    if not arrays:
        raise UsageError("every input has an --input-value: there is nothing to calibrate on")
    given = _given_values([vi for vi in inputs if vi.name in values], values, input_shapes, arrays)
    note = (f"no --calibration data: decisions were made on {samples} seeded random N(0, 1) inputs, which "
            "are weaker evidence than real inputs")
    return Calibration(arrays, None, "random", size, [note], given)


def top1_accuracy(outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float | None:
    """Share of samples whose largest score (over the classes axis 1, or the last) is the label."""
    hits = total = 0
    for scores, truth in zip(outputs, labels):
        scores = np.asarray(scores)
        if scores.ndim < 2 or scores.shape[0] != truth.shape[0]:
            return None
        flat = scores.reshape(scores.shape[0], scores.shape[1], -1)
        if flat.shape[2] != 1:
            return None
        hits += int(np.count_nonzero(flat[:, :, 0].argmax(axis=1) == truth))
        total += truth.shape[0]
    return hits / total if total else None


def _dims_text(dims) -> str:
    return ", ".join(str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                     for d in dims)
