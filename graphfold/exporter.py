"""A graphsurgeon graph as an ONNX model, each weight copied into it once.

``gs.export_onnx`` builds every initializer as a TensorProto, copies the list into a new
GraphProto (``make_graph``) and that into a new ModelProto (``make_model``): three copies of
all the weights, transient but at once, which on a large model cost as much time as saving it
and raise the peak memory by twice its size. Here the top graph is assembled in the model
itself: a weight computed in numpy is written once (its bytes), an unchanged one is copied
once from the original proto. Nodes, value infos, subgraphs and functions are graphsurgeon's
own export, and so is any constant it must convert on the way (an ``export_dtype``).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx, update_import_domains
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from graphfold.mapped import DETACH_ELEMENTS, DETACHABLE


def export_model(graph: gs.Graph, detached: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """What ``gs.export_onnx(graph, do_type_check=False)`` returns, built without its copies.

    ``detached``: large weights held as arrays are not copied at all: their initializers are
    headers (name, type, dims) and the arrays go into ``detached`` by name (see mapped.py).
    """
    model = onnx.ModelProto(ir_version=graph.ir_version or onnx.IR_VERSION,
                            producer_name=graph.producer_name or "", producer_version=graph.producer_version or "")
    out = model.graph
    out.name = graph.name or ""
    if graph.doc_string:
        out.doc_string = graph.doc_string
    out.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    out.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    out.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensors = graph.tensors()
    for tensor in tensors.values():
        if isinstance(tensor, gs.Constant):
            _add_initializer(out, tensor, detached)
    for tensor in graph.inputs + graph.outputs:
        tensors.pop(tensor.name, None)
    # As graphsurgeon does: value_info only for variables whose type or shape is known.
    out.value_info.extend(OnnxExporter.export_value_info_proto(t, False) for t in tensors.values()
                          if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None))
    model.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
    model.opset_import.extend(update_import_domains(graph))
    return model


def _add_initializer(out: onnx.GraphProto, tensor: gs.Constant, detached: dict[str, np.ndarray] | None) -> None:
    values = tensor._values
    if isinstance(values, SparseValues):
        out.sparse_initializer.append(values.tensor)
        return
    if isinstance(values, LazyValues):  # never read: the original proto, copied once
        proto = out.initializer.add()
        proto.CopyFrom(values.tensor)
        proto.name = tensor.name
        return
    if dtype_to_onnx(tensor.dtype) != dtype_to_onnx(tensor.export_dtype):
        out.initializer.append(OnnxExporter.export_tensor_proto(tensor))  # graphsurgeon converts it
        return
    proto = out.initializer.add(name=tensor.name, data_type=dtype_to_onnx(tensor.dtype), dims=tensor.shape)
    if detached is not None and isinstance(values, np.ndarray) and values.size > DETACH_ELEMENTS \
            and proto.data_type in DETACHABLE and tensor.data_location is None:
        detached[tensor.name] = values
        return
    proto.raw_data = tensor.values.tobytes()
    if tensor.data_location is not None:
        proto.data_location = tensor.data_location
