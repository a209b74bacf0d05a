"""Tensor shapes for analysis, inferred on a weightless copy of the model.

ONNX shape inference only needs each initializer's dims, not its data (except the small
tensors that feed Reshape and friends), so it runs on a skeleton whose large weights are
emptied: fast on big models and safe for models over 2 GB. Two tables come out: *static*
shapes as the model fixes them (symbolic dims are None), which decide whether a rewrite is
exact, and *concrete* shapes with symbolic dims resolved, which only feed the cost model.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import onnx

from graphfold.inputs import real_inputs, resolve_shape
from graphfold.io import without_initializers
from graphfold.stats import iter_graphs

log = logging.getLogger(__name__)

Shape = tuple

# Initializers up to this many elements keep their data: shape-carrying tensors are small.
KEEP_DATA_ELEMENTS = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers have dims but no data."""
    skel = without_initializers(model)
    graph = skel.graph
    for init in model.graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= KEEP_DATA_ELEMENTS and \
                init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return skel


def _infer(model: onnx.ModelProto) -> dict[str, Shape]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # inference is an aid; a model it cannot handle still folds
        log.info("shape inference failed: %s", exc)
        inferred = model
    shapes: dict[str, Shape] = {}
    # If/Loop/Scan bodies too (statistics count their layers); the main graph's entries come last
    # and win should a body reuse a name.
    for graph in reversed(list(iter_graphs(inferred.graph))):
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
                continue
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        for init in graph.initializer:
            shapes[init.name] = tuple(init.dims)
    return shapes


def infer_static(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes as fixed by the model itself; symbolic dims stay None."""
    return _infer(skeleton(model))


def infer_concrete(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                   batch: int | None = None) -> dict[str, Shape]:
    """Shapes with every graph input resolved (user shapes, else batch 1 and default dims)."""
    skel = skeleton(model)
    inputs = {vi.name: vi for vi in real_inputs(skel.graph)}
    for name, vi in inputs.items():
        try:
            dims = resolve_shape(vi, input_shapes, batch)
        except Exception:  # an input without a shape keeps it unknown
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add(dim_value=int(d))
    # Stale value_info from exporters (in If/Loop bodies too) would fight the new input dims.
    for graph in iter_graphs(skel.graph):
        del graph.value_info[:]
    for out in skel.graph.output:
        out.type.tensor_type.ClearField("shape")
    return _infer(skel)
