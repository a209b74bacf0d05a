"""Concrete input shapes, user-given input values and seeded random inputs for a model's graph inputs.

Validation and benchmarking both need to feed a model whose inputs may have symbolic
dims. A dim is resolved, in order, from the user's ``--input-shape``, from ``batch`` for
the leading axis, else 1 for the leading axis and ``DEFAULT_DIM`` for the others.

Some inputs cannot be random: a sample rate that must be 16000, a state that must start at
zero. ``--input-value NAME:VALUE`` gives one a fixed value (a scalar, a comma list shaped by
``--input-shape``, or a ``.npy`` file), fed wherever graphfold runs the model; a scalar given
for a tensor input fills it.
"""
from __future__ import annotations

import math
import re
from typing import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from graphfold.errors import UsageError, first_line

DEFAULT_DIM = 32
# Random data for one input is refused beyond this size (a model may declare absurd dims).
MAX_INPUT_BYTES = 2**32

ShapeMap = Mapping[str, Sequence[int]]
ValueMap = Mapping[str, object]  # arrays, numbers or nested lists, by input name

_SHAPE_SPEC = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:[,x]\d+)*)$")


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """Parse ``NAME:d0,d1,...`` (``x`` also separates dims) into a name and dims."""
    match = _SHAPE_SPEC.match(spec.strip())
    if not match:
        raise UsageError(f"bad --input-shape {spec!r}: expected NAME:d0,d1,... such as input:1,3,224,224")
    dims = [int(d) for d in re.split(r"[,x]", match.group("dims"))]
    if 0 in dims:
        # An empty input runs, but then there is nothing to compare or count.
        raise UsageError(f"bad --input-shape {spec!r}: every dim must be at least 1")
    return match.group("name"), dims


def parse_input_value(spec: str) -> tuple[str, np.ndarray]:
    """Parse ``NAME:VALUE``: a number, a comma list of numbers, ``true``/``false``, or a ``.npy`` path."""
    name, sep, text = spec.partition(":")
    name, text = name.strip(), text.strip()
    if not sep or not name or not text:
        raise UsageError(f"bad --input-value {spec!r}: expected NAME:VALUE such as sr:16000, "
                         "mask:1,0,1 (with --input-shape) or state:state.npy")
    if text.endswith(".npy"):
        try:
            return name, np.load(text, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"--input-value {name}: cannot read {text} as a .npy array ({first_line(exc)})") from None
    try:
        numbers = [_number(token) for token in text.split(",") if token.strip()]
    except ValueError:
        raise UsageError(f"bad --input-value {spec!r}: {text!r} is not a number, a comma list of numbers "
                         "or a .npy path") from None
    if not numbers:
        raise UsageError(f"bad --input-value {spec!r}: no number given")
    return name, np.asarray(numbers[0] if "," not in text else numbers)


def _number(token: str) -> int | float | bool:
    token = token.strip().lower()
    if token in ("true", "false"):
        return token == "true"
    try:
        return int(token)
    except ValueError:
        return float(token)


def fit_input_values(model: onnx.ModelProto, values: ValueMap | None,
                     input_shapes: ShapeMap | None = None) -> dict[str, np.ndarray]:
    """The given values as their inputs take them: the input's dtype, a shape its fixed dims
    (and ``input_shapes``) allow. A 0-d value given for a tensor input stays 0-d: it fills
    whatever shape the input gets. Refuses unknown names and values that do not fit."""
    if not values:
        return {}
    inputs = {vi.name: vi for vi in real_inputs(model.graph)}
    fitted = {}
    for name, value in values.items():
        if name not in inputs:
            raise UsageError(f"--input-value {name}: the model has no input of that name "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        fitted[name] = _fit_value(inputs[name], np.asarray(value), input_shapes)
    return fitted


def _fit_value(vi: onnx.ValueInfoProto, value: np.ndarray, input_shapes: ShapeMap | None) -> np.ndarray:
    name, tensor_type = vi.name, vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    value = _cast_value(name, value, dtype)
    given = list(input_shapes[name]) if input_shapes and name in input_shapes else None
    if not tensor_type.HasField("shape"):
        return value.reshape(given) if given is not None and value.size == math.prod(given) else value
    dims = tensor_type.shape.dim
    if value.ndim == 0:
        return value  # a scalar, or a fill for a tensor input
    if given is not None:
        if value.size != math.prod(given):
            raise UsageError(f"--input-value {name}: {value.size} value(s) do not fill --input-shape "
                             f"{name}:{','.join(map(str, given))}")
        return value.reshape(given)
    if value.ndim != len(dims):
        raise UsageError(f"--input-value {name}: a value of shape {list(value.shape)} for an input of rank "
                         f"{len(dims)}; give its shape with --input-shape {name}:d0,d1,...")
    for axis, (size, dim) in enumerate(zip(value.shape, dims)):
        if dim.HasField("dim_value") and dim.dim_value > 0 and size != dim.dim_value:
            raise UsageError(f"--input-value {name}: dim {axis} is {size}, but the model fixes it at {dim.dim_value}")
    return value


def _cast_value(name: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``value`` as ``dtype``, refused where that would change it (a fraction for an integer input,
    a number out of the type's range, a number for a string input...)."""
    if value.dtype == dtype:
        return value
    kinds = {"b": "bool", "i": "integer", "u": "integer", "f": "float"}
    if value.dtype.kind == "O":  # a Python int beyond int64
        raise UsageError(f"--input-value {name}: the input takes {dtype.name}, which cannot hold the value given "
                         f"({_preview(value)})")
    if dtype.kind not in kinds or value.dtype.kind not in kinds:
        raise UsageError(f"--input-value {name}: the input takes {dtype.name}, given {value.dtype.name}")
    with np.errstate(all="ignore"):
        cast = value.astype(dtype)
        same = np.array_equal(cast.astype(np.float64), value.astype(np.float64)) if dtype.kind != "f" else \
            bool(np.all(np.isfinite(cast) | ~np.isfinite(value.astype(np.float64))))
    if not same:
        raise UsageError(f"--input-value {name}: the input takes {dtype.name}, which cannot hold the value given "
                         f"({_preview(value)})")
    return cast


def _preview(value: np.ndarray) -> str:
    flat = value.reshape(-1)
    text = ", ".join(str(v) for v in flat[:4])
    return text + (", ..." if flat.size > 4 else "")


def value_shapes(values: Mapping[str, np.ndarray], input_shapes: ShapeMap | None) -> dict[str, list[int]] | None:
    """``input_shapes`` with the shapes the given values fix (a 0-d fill fixes none)."""
    shapes = {name: list(value.shape) for name, value in values.items() if value.ndim > 0}
    shapes.update(input_shapes or {})
    return shapes or None


def shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """``x:1x3x32x32, sr:scalar``: input shapes for a message."""
    return ", ".join(f"{name}:{'x'.join(map(str, dims)) or 'scalar'}" for name, dims in shapes.items())


def dynamic_inputs(model: onnx.ModelProto, input_shapes: ShapeMap | None) -> list[str]:
    """Run-time inputs with a dim the model leaves open and ``input_shapes`` does not give."""
    names = []
    for vi in real_inputs(model.graph):
        tensor_type = vi.type.tensor_type
        if vi.name in (input_shapes or {}) or not tensor_type.HasField("shape"):
            continue
        if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in tensor_type.shape.dim):
            names.append(vi.name)
    return names


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (older exporters also list initializers as inputs)."""
    initializers = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in initializers]


def resolve_shape(vi: onnx.ValueInfoProto, input_shapes: ShapeMap | None = None,
                  batch: int | None = None) -> list[int]:
    """Concrete dims for one graph input."""
    tensor_type = vi.type.tensor_type
    if input_shapes and vi.name in input_shapes:
        dims = [int(d) for d in input_shapes[vi.name]]
        if tensor_type.HasField("shape"):
            _check_given_shape(vi.name, dims, tensor_type.shape)
        return dims
    if not tensor_type.HasField("shape"):
        raise UsageError(f"input {vi.name!r} has no shape; give it with --input-shape {vi.name}:d0,d1,...")
    dims = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            value = dim.dim_value  # a fixed dim is part of the model's contract
        elif axis == 0:
            value = batch or 1
        else:
            value = DEFAULT_DIM
        dims.append(int(value))
    return dims


def _check_given_shape(name: str, dims: list[int], shape: onnx.TensorShapeProto) -> None:
    """Refuse a user shape the model cannot run with, before onnxruntime does so at length."""
    if len(dims) != len(shape.dim):
        raise UsageError(f"--input-shape {name}: {len(dims)} dims given, but the input has rank {len(shape.dim)}")
    for axis, (given, dim) in enumerate(zip(dims, shape.dim)):
        if dim.HasField("dim_value") and dim.dim_value > 0 and given != dim.dim_value:
            raise UsageError(f"--input-shape {name}: dim {axis} is {given}, but the model fixes it at "
                             f"{dim.dim_value}")


def check_names(model: onnx.ModelProto, input_shapes: ShapeMap | None) -> None:
    """Refuse shapes for names that are not run-time inputs (a typo would be silently ignored)."""
    names = [vi.name for vi in real_inputs(model.graph)]
    unknown = sorted(set(input_shapes or {}) - set(names))
    if unknown:
        raise UsageError(f"--input-shape {unknown[0]}: the model has no input of that name "
                         f"(inputs: {', '.join(names) or 'none'})")


def check_input_shapes(model: onnx.ModelProto, input_shapes: ShapeMap | None) -> None:
    """Refuse user shapes that name no input or contradict the model, whatever runs next."""
    if not input_shapes:
        return
    check_names(model, input_shapes)
    for vi in real_inputs(model.graph):
        if vi.name in input_shapes:
            resolve_shape(vi, input_shapes)


def resolve_shapes(model: onnx.ModelProto, input_shapes: ShapeMap | None = None,
                   batch: int | None = None) -> dict[str, list[int]]:
    """Concrete dims for every run-time input of ``model``."""
    check_names(model, input_shapes)
    return {vi.name: resolve_shape(vi, input_shapes, batch) for vi in real_inputs(model.graph)}


def random_array(elem_type: int, shape: Sequence[int], rng: np.random.Generator,
                 full_integers: bool = False) -> np.ndarray:
    """Seeded data for one input: N(0, 1) floats, random bools, and small non-negative integers
    (with ``full_integers``: integers over the whole dtype, see ``spanning_integers``)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    size = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
    if size > MAX_INPUT_BYTES:
        raise UsageError(f"an input of shape {'x'.join(map(str, shape))} would take {size / 2**30:.3g} GiB; "
                         "choose smaller dims with --input-shape")
    if dtype == np.bool_:
        # A comparison of a 0-d array gives a numpy scalar, which onnxruntime refuses.
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        if full_integers:
            return spanning_integers(np.dtype(dtype), shape, rng)
        # Small non-negative values stay valid as indices, lengths and class ids in most graphs.
        return rng.integers(0, 3, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise UsageError(f"cannot make random data of type {np.dtype(dtype).name}; "
                     "give real inputs instead")


def spanning_integers(dtype: np.dtype, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Integers spread over the dtype's whole range, with its minimum and maximum (where integer
    arithmetic wraps: ``Abs(-128) = -128`` in int8) and values near zero among them."""
    info = np.iinfo(dtype)
    values = np.asarray(rng.integers(info.min, info.max, size=tuple(shape), dtype=dtype, endpoint=True))
    flat = values.reshape(-1)
    near_zero = rng.random(flat.size) < 0.25
    flat[near_zero] = rng.integers(max(int(info.min), -3), 4, size=int(near_zero.sum()))
    specials = rng.permutation(np.array(sorted({int(info.min), int(info.max), 0, 1, max(int(info.min), -1)}), dtype))
    count = min(flat.size, len(specials))
    flat[rng.choice(flat.size, count, replace=False)] = specials[:count]
    return values


def make_inputs(model: onnx.ModelProto, input_shapes: ShapeMap | None = None, seed: int = 0,
                batch: int | None = None, values: Mapping[str, np.ndarray] | None = None,
                full_integers: bool = False) -> dict[str, np.ndarray]:
    """Seeded random feeds for every run-time input of ``model``, but the given ``values``
    (fitted by ``fit_input_values``; a 0-d one for a tensor input fills it). Random integers
    span their whole dtype with ``full_integers``, else they are small and non-negative."""
    check_names(model, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in real_inputs(model.graph):
        value = (values or {}).get(vi.name)
        if value is not None and (value.ndim > 0 or not vi.type.tensor_type.HasField("shape")):
            feeds[vi.name] = value
            continue
        shape = resolve_shape(vi, input_shapes, batch)
        if value is None:
            feeds[vi.name] = random_array(vi.type.tensor_type.elem_type, shape, rng, full_integers)
        else:
            feeds[vi.name] = np.full(shape, value)
    return feeds


def with_small_integers(feeds: Mapping[str, np.ndarray], seed: int = 0,
                        keep: Collection[str] = ()) -> dict[str, np.ndarray] | None:
    """``feeds`` with every integer input but those in ``keep`` (values the user gave) redrawn
    small and non-negative, valid as an index or a size; None when there is none to redraw."""
    rng = np.random.default_rng(seed)
    redraw = {k for k, v in feeds.items() if k not in keep and np.issubdtype(np.asarray(v).dtype, np.integer)}
    if not redraw:
        return None
    return {k: rng.integers(0, 3, size=np.shape(v)).astype(v.dtype) if k in redraw else v for k, v in feeds.items()}
