"""Intermediate activations of a model on calibration batches, by onnxruntime.

A model is cut down to the nodes that compute the requested tensors (from the graph inputs, or
from given intermediate tensors, which then become the inputs), so a refit near the input runs
only the prefix it needs and a candidate is scored by running only the suffix after the region.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from graphfold.refit.regions import constant_names

Batches = Sequence[Mapping[str, np.ndarray]]


def sliced(model: onnx.ModelProto, outputs: Sequence[str], inputs: Sequence[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` computing just ``outputs``, from ``inputs`` (default: the graph's own)."""
    graph = model.graph
    constants = constant_names(graph)
    given = set(inputs) if inputs is not None else {vi.name for vi in graph.input if vi.name not in constants}
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    needed, keep, stack = set(), set(), [name for name in outputs if name not in given]
    while stack:
        name = stack.pop()
        if name in needed or name in given or name not in producers:
            continue
        needed.add(name)
        index = producers[name]
        keep.add(index)
        stack.extend(i for i in graph.node[index].input if i)
    nodes = [graph.node[i] for i in sorted(keep)]
    used = {name for node in nodes for name in node.input}
    types = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    elem = _elem_type(graph)
    graph_inputs = [types[name] if name in types else helper.make_tensor_value_info(name, elem, None)
                    for name in (inputs if inputs is not None else [vi.name for vi in graph.input
                                                                      if vi.name not in constants])]
    graph_outputs = [helper.make_tensor_value_info(name, elem, None) for name in outputs]
    out_graph = helper.make_graph(nodes, graph.name, graph_inputs, graph_outputs,
                                  [init for init in graph.initializer if init.name in used])
    out = helper.make_model(out_graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _elem_type(graph: onnx.GraphProto) -> int:
    for vi in graph.input:
        if vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


class Session:
    """An onnxruntime session over a sliced model (1 thread, default optimizations)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {k: feeds[k] for k in self.inputs})))


def collect(model: onnx.ModelProto, names: Sequence[str], batches: Batches,
            inputs: Sequence[str] | None = None) -> dict[str, list[np.ndarray]]:
    """The named tensors, one array per batch (``batches`` feed ``inputs`` or the graph inputs)."""
    session = Session(sliced(model, list(names), inputs))
    got: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        result = session.run(batch)
        for name in names:
            got[name].append(result[name])
    return got
