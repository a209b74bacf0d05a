"""Concrete input shapes and seeded random inputs for a model's graph inputs.

Validation and benchmarking both need to feed a model whose inputs may have symbolic
dims. A dim is resolved, in order, from the user's ``--input-shape``, from ``batch`` for
the leading axis, else 1 for the leading axis and ``DEFAULT_DIM`` for the others.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from graphfold.errors import UsageError

DEFAULT_DIM = 32
# Random data for one input is refused beyond this size (a model may declare absurd dims).
MAX_INPUT_BYTES = 2**32

ShapeMap = Mapping[str, Sequence[int]]

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


def random_array(elem_type: int, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Seeded data for one input: N(0, 1) floats, small non-negative integers, random bools."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    size = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
    if size > MAX_INPUT_BYTES:
        raise UsageError(f"an input of shape {'x'.join(map(str, shape))} would take {size / 2**30:.3g} GiB; "
                         "choose smaller dims with --input-shape")
    if dtype == np.bool_:
        # A comparison of a 0-d array gives a numpy scalar, which onnxruntime refuses.
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        # Small non-negative values stay valid as indices, lengths and class ids in most graphs.
        return rng.integers(0, 3, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise UsageError(f"cannot make random data of type {np.dtype(dtype).name}; "
                     "give real inputs instead")


def make_inputs(model: onnx.ModelProto, input_shapes: ShapeMap | None = None, seed: int = 0,
                batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random feeds for every run-time input of ``model``."""
    check_names(model, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in real_inputs(model.graph):
        shape = resolve_shape(vi, input_shapes, batch)
        feeds[vi.name] = random_array(vi.type.tensor_type.elem_type, shape, rng)
    return feeds
