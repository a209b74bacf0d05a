"""Tensor shapes for analysis, inferred on a weightless copy of the model.

ONNX shape inference only needs each initializer's dims, not its data (except the small
tensors that feed Reshape and friends), so it runs on a skeleton whose large weights are
emptied: fast on big models and safe for models over 2 GB. Two tables come out: *static*
shapes as the model fixes them (symbolic dims are None), which decide whether a rewrite is
exact, and *concrete* shapes with symbolic dims resolved, which feed the cost model and the
MAC counts.

ONNX's own inference stops at shape arithmetic it cannot evaluate (``Div`` of a dim, a
``Reshape`` whose target is computed from ``Shape``); where it leaves a tensor unknown,
onnxruntime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``), which
carries dims as sympy expressions through such chains, fills it in.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
from typing import Iterator, Mapping, Sequence, Union

import onnx

from graphfold.inputs import real_inputs, resolve_shape
from graphfold.io import without_initializers
from graphfold.stats import iter_graphs

log = logging.getLogger(__name__)

Shape = tuple
Dim = Union[int, str, None]  # a value, a symbolic name, or unknown

# Initializers up to this many elements keep their data: shape-carrying tensors are small.
KEEP_DATA_ELEMENTS = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers have dims but no data."""
    skel = without_initializers(model)
    graph = skel.graph
    for init in model.graph.initializer:
        if math.prod(init.dims) <= KEEP_DATA_ELEMENTS and \
                init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return skel


def _read(top: onnx.GraphProto) -> dict[str, tuple[Dim, ...]]:
    shapes: dict[str, tuple[Dim, ...]] = {}
    # If/Loop/Scan bodies too (statistics count their layers); the main graph's entries come last
    # and win should a body reuse a name.
    for graph in reversed(list(iter_graphs(top))):
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
                continue
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in tensor_type.shape.dim)
        for init in graph.initializer:
            shapes[init.name] = tuple(init.dims)
    return shapes


def _onnx_inference(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # inference is an aid; a model it cannot handle still folds
        log.info("shape inference failed: %s", exc)
        inferred = model
    return _read(inferred.graph)


def _incomplete(model: onnx.ModelProto, shapes: Mapping[str, tuple[Dim, ...]]) -> bool:
    """Whether some node output of the top-level graph has no shape or a dim other than a number or
    one of the graph inputs' symbolic dims (ONNX names the dims it could not work out ``unk__N``).
    Outputs nothing reads (a Dropout's mask) count for no statistic and no pass: they are not asked
    about, or an old model would pay for symbolic inference (sympy, 0.3 s) to learn nothing."""
    symbols = {d for vi in model.graph.input for d in shapes.get(vi.name, ()) if isinstance(d, str)}
    read = {name for graph in iter_graphs(model.graph) for node in graph.node for name in node.input}
    read |= {vi.name for vi in model.graph.output}
    return any(name in read and (name not in shapes or any(not isinstance(d, int) and d not in symbols
                                                           for d in shapes[name]))
               for node in model.graph.node for name in node.output)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    # The tool warns about merges and broadcasts it cannot decide; only the CLI may print, and the
    # process's logging is left as it was found.
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _symbolic_shape_infer():
    """onnxruntime's ``tools/symbolic_shape_infer.py``, loaded on its own: ``onnxruntime.tools``'
    ``__init__`` imports torch whenever it is installed (1.5 s, and the CLI must not import it)."""
    name = "graphfold._ort_symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("onnxruntime is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "tools", "symbolic_shape_infer.py")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or not os.path.exists(path):
        raise ImportError(f"{path}: no symbolic shape inference in this onnxruntime")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _symbolic_inference(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Shapes from onnxruntime's symbolic inference; empty where it is unavailable or fails."""
    try:
        sym = _symbolic_shape_infer()
    except Exception as exc:  # sympy missing, or a build without the tools package
        log.info("symbolic shape inference unavailable: %s", exc)
        return {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 7:
        return {}
    # The steps of SymbolicShapeInference.infer_shapes, which on a partial result saves the model
    # to the current directory and raises: a partial result is still worth having, and a library
    # must not write files of its own.
    inference = sym.SymbolicShapeInference(int_max=2**31 - 1, auto_merge=False, guess_output_rank=False,
                                           verbose=0)
    try:
        with _quiet(sym.__name__):
            inference._preprocess(model)
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
        return _read(inference.out_mp_.graph)
    except Exception as exc:  # an op it does not know, a merge it refuses: keep onnx's answer
        log.info("symbolic shape inference failed: %s", exc)
        out = getattr(inference, "out_mp_", None)
        return _read(out.graph) if out is not None else {}


def _fill(shapes: dict[str, tuple[Dim, ...]], extra: Mapping[str, tuple[Dim, ...]]) -> None:
    """Complete ``shapes`` from ``extra``: missing tensors, and unknown or symbolic dims it knows."""
    for name, other in extra.items():
        own = shapes.get(name)
        if own is None:
            shapes[name] = other
        elif len(own) == len(other):
            shapes[name] = tuple(o if isinstance(o, int) or not isinstance(x, int) else x
                                 for o, x in zip(own, other))


def _infer(model: onnx.ModelProto) -> dict[str, Shape]:
    shapes = _onnx_inference(model)
    if _incomplete(model, shapes):
        _fill(shapes, _symbolic_inference(model))
    return {name: tuple(d if isinstance(d, int) else None for d in dims) for name, dims in shapes.items()}


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
