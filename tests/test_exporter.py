"""graphfold's exporter writes the same model as graphsurgeon's ``export_onnx``, byte for byte,
whether the weights were never read, read or computed anew."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold.exporter import export_model
from tests.util import make_model, model_from_text

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def same_as_graphsurgeon(graph: gs.Graph) -> onnx.ModelProto:
    ours = export_model(graph)
    assert ours.SerializeToString() == gs.export_onnx(graph, do_type_check=False).SerializeToString()
    return ours


@pytest.mark.parametrize("name", ["repvgg_small.onnx", "resnet_bn.onnx"])
def test_unread_read_and_new_weights(name):
    graph = gs.import_onnx(onnx.load(os.path.join(MODELS, name)))
    same_as_graphsurgeon(graph)  # every weight still lazy: the original protos
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    constants[0].values  # read: now a numpy array
    constants[1].values = np.asarray(constants[1].values) * 2  # computed anew
    model = same_as_graphsurgeon(graph)
    onnx.checker.check_model(model)
    assert len(model.graph.initializer) == len(constants)


def test_subgraphs_and_value_info():
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, bool c) => (float[2] y) {
            h = Mul(x, x)
            y = If(c) <then_branch = t () => (float[2] a) { a = Add(h, h) },
                       else_branch = e () => (float[2] b) { b = Identity(h) }>
        }""")
    graph = gs.import_onnx(model)
    graph.tensors()["h"].to_variable(dtype=np.float32, shape=[2])
    assert len(same_as_graphsurgeon(graph).graph.value_info) == 1


def test_typed_and_boolean_constants():
    arrays = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "i64": np.array([3, -1], np.int64),
              "flag": np.array([True, False])}
    nodes = [helper.make_node("Identity", [name], [f"{name}.out"]) for name in arrays]
    model = make_model(nodes, [], [helper.make_tensor_value_info(f"{n}.out", numpy_helper.from_array(a).data_type,
                                                                  list(a.shape)) for n, a in arrays.items()],
                       [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            tensor.values = np.array(tensor.values)  # numpy-held, as after a fold
    ours = same_as_graphsurgeon(graph)
    for init in ours.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), arrays[init.name])
    assert {init.data_type for init in ours.graph.initializer} == {TensorProto.FLOAT16, TensorProto.INT64,
                                                                  TensorProto.BOOL}
