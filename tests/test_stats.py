"""graphfold.stats: node, conv, depth, parameter and MAC counts on graphs small enough to count by hand."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold import shapes
from graphfold.shapes import infer_concrete, infer_static
from graphfold.stats import depth, model_stats, node_macs, parameter_count
from tests.util import make_model, model_from_text

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx")


def weight(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def residual_model(batch="N") -> onnx.ModelProto:
    """x -> conv1 -> relu -> conv2 -> (+ x) -> y: depth 2, with a 1-deep skip beside it."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], group=2, name="conv2"),
             helper.make_node("Add", ["c2", "x"], ["y"])]
    return make_model(nodes, [vi("x", [batch, 4, 6, 6])], [vi("y", [batch, 4, 6, 6])],
                      [weight("w1", [4, 4, 3, 3]), weight("b1", [4]), weight("w2", [4, 2, 3, 3])])


def stats(model: onnx.ModelProto, shapes=None) -> dict:
    return model_stats(model, infer_concrete(model, shapes))


def test_residual_block_counts():
    # conv1: 4*6*6 outputs x 4*3*3 MACs; conv2 (2 groups): 4*6*6 x 2*3*3.
    assert stats(residual_model()) == {
        "nodes": 4, "convs": 2, "depth": 2,
        "params": 4 * 4 * 9 + 4 + 4 * 2 * 9,
        "macs": 144 * 36 + 144 * 18,
    }


def test_macs_scale_with_the_given_batch():
    assert stats(residual_model(), {"x": [3, 4, 6, 6]})["macs"] == 3 * (144 * 36 + 144 * 18)


def test_macs_unknown_when_a_layer_shape_is_unknown():
    # Without concrete shapes the symbolic batch leaves the convs' output size open.
    assert model_stats(residual_model(), infer_static(residual_model()))["macs"] is None
    assert model_stats(residual_model(batch=2), infer_static(residual_model(batch=2)))["macs"] == \
        2 * (144 * 36 + 144 * 18)


def test_depth_ignores_node_order():
    model = residual_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    assert depth(model.graph) == 2


def test_depth_is_the_longest_chain_of_layers():
    # Two parallel paths of 3 and 1 layers joined, then one more: depth 4.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a1"]), helper.make_node("MatMul", ["a1", "w"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["a3"]), helper.make_node("Gemm", ["a3", "w"], ["a4"]),
             helper.make_node("MatMul", ["x", "w"], ["b1"]),
             helper.make_node("Add", ["a4", "b1"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 2])], [vi("y", [2, 2])], [weight("w", [2, 2])])
    assert depth(model.graph) == 4
    assert stats(model)["macs"] == 5 * 2 * 2 * 2


def test_depth_of_a_long_chain_does_not_recurse():
    nodes = [helper.make_node("MatMul", [f"t{i}", "w"], [f"t{i + 1}"]) for i in range(3000)]
    model = make_model(nodes, [vi("t0", [2, 2])], [vi("t3000", [2, 2])], [weight("w", [2, 2])])
    assert depth(model.graph) == 3000


def test_params_count_constant_nodes_and_subgraphs():
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones(5, np.float32)))],
        "then", [], [vi("t", [5])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["k"], ["e"])], "else", [], [vi("e", [5])])
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(5, np.float32))),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [vi("y", [5])],
                       [weight("unused", [2, 3])])
    assert parameter_count(model.graph) == 6 + 5 + 5
    counted = stats(model)
    assert counted["nodes"] == 3  # Constant, If, and one node of the branch taken
    assert counted["convs"] == 0 and counted["depth"] == 0 and counted["macs"] == 0


def test_layer_macs():
    shapes = {"x": (2, 5), "w": (5, 3), "y": (2, 3), "xt": (5, 2), "img": (1, 4, 3, 3), "wt": (4, 2, 3, 3),
              "up": (1, 2, 5, 5), "a": (2, 7, 5), "m": (2, 7, 3)}
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"])
    gemm_t = helper.make_node("Gemm", ["xt", "w"], ["y"], transA=1)
    conv_t = helper.make_node("ConvTranspose", ["img", "wt"], ["up"])
    matmul = helper.make_node("MatMul", ["a", "w"], ["m"])
    assert node_macs(gemm, shapes) == 2 * 3 * 5
    assert node_macs(gemm_t, shapes) == 2 * 3 * 5
    assert node_macs(conv_t, shapes) == 4 * 3 * 3 * 2 * 3 * 3  # every input element feeds Cout/g*k*k
    assert node_macs(matmul, shapes) == 2 * 7 * 3 * 5
    assert node_macs(helper.make_node("Relu", ["x"], ["r"]), shapes) == 0
    assert node_macs(helper.make_node("MatMul", ["x", "unknown"], ["z"]), shapes) is None


def test_sample_resnet():
    model = onnx.load(SAMPLE)
    counted = stats(model)
    # Depth: the stem, two convs in each block (the projection runs beside them) and the Gemm head.
    assert counted["convs"] == 6 and counted["depth"] == 1 + 2 + 2 + 1
    assert counted["params"] == 20282
    assert counted["macs"] == 8831296


# --- through If/Loop/Scan bodies (issue 10) ---------------------------------------------------

def conv_body(name: str, convs: int, channels: int = 4) -> onnx.GraphProto:
    """A body of ``convs`` 3x3 convs in a chain on the outer tensor x (4 channels, 6x6)."""
    nodes, inits, previous = [], [], "x"
    for index in range(convs):
        nodes.append(helper.make_node("Conv", [previous, f"{name}_w{index}"], [f"{name}_c{index}"], pads=[1] * 4))
        inits.append(weight(f"{name}_w{index}", [channels, 4 if index == 0 else channels, 3, 3]))
        previous = f"{name}_c{index}"
    return helper.make_graph(nodes, name, [], [vi(previous, [1, channels, 6, 6])], inits)


def test_if_branches_are_alternatives_and_the_larger_counts():
    node = helper.make_node("If", ["cond"], ["y"], then_branch=conv_body("then", 2),
                            else_branch=conv_body("else", 1))
    model = make_model([node], [vi("x", [1, 4, 6, 6]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [vi("y", [1, 4, 6, 6])])
    per_conv = 4 * 6 * 6 * 4 * 9
    assert stats(model) == {"nodes": 1 + 2, "convs": 2, "depth": 2, "params": 2 * 144, "macs": 2 * per_conv}


def test_a_loop_body_counts_once_after_the_layers_before_it():
    body = conv_body("body", 1)
    body.input.extend([helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    body.node.append(helper.make_node("Identity", ["c"], ["c_out"]))
    del body.output[:]
    body.output.extend([helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), vi("body_c0", [1, 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x0", "w"], ["x"], pads=[1] * 4),
             helper.make_node("Loop", ["trips", ""], ["y"], body=body)]
    model = make_model(nodes, [vi("x0", [1, 4, 6, 6]), helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
                       [vi("y", [None, 1, 4, 6, 6])], [weight("w", [4, 4, 3, 3])])
    per_conv = 4 * 6 * 6 * 4 * 9
    assert stats(model) == {"nodes": 2 + 2, "convs": 2, "depth": 2, "params": 2 * 144, "macs": 2 * per_conv}


def wrapped_in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s nodes as the then-branch of one If on a run-time bool (the else-branch a
    constant), its weights left in the outer graph, and an Identity before the If for graphfold
    to remove, as exports of models with a data-dependent branch look."""
    graph, out = model.graph, model.graph.output[0]
    then = helper.make_graph(list(graph.node), "then", [], [out])
    zeros = numpy_helper.from_array(np.zeros([1, 10], np.float32))
    other = helper.make_graph([helper.make_node("Constant", [], ["zeros"], value=zeros)], "else", [],
                              [vi("zeros", None)])
    nodes = [helper.make_node("Identity", ["cond"], ["cond_copy"]),
             helper.make_node("If", ["cond_copy"], [out.name], then_branch=then, else_branch=other)]
    inputs = list(graph.input) + [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    wrapped = helper.make_model(helper.make_graph(nodes, "wrapped", inputs, [out], list(graph.initializer)),
                                opset_imports=model.opset_import)
    wrapped.ir_version = model.ir_version
    onnx.checker.check_model(wrapped, full_check=True)
    return wrapped


def test_statistics_of_a_model_wrapped_in_an_if():
    import graphfold

    sample = stats(onnx.load(SAMPLE))
    folded, report = graphfold.fold(wrapped_in_if(onnx.load(SAMPLE)))
    assert report.rewrites  # the Identity went: the result was rebuilt by graphsurgeon
    for counted in (report.before, report.after):
        assert counted["depth"] == sample["depth"] and counted["macs"] == sample["macs"]
        assert counted["convs"] == sample["convs"]
        assert sample["params"] <= counted["params"] <= sample["params"] + 10


def shape_arithmetic_model() -> onnx.ModelProto:
    """conv -> reshape to [N, 8, H, W / 2, 2] computed from Shape -> Div -> MatMul: ONNX's own
    inference cannot divide a dim, so the MatMul's shape needs symbolic inference."""
    model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,H,W] x) => (float[N,8,H,?,5] y) {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        s = Shape(c)
        three = Constant<value = int64[1] {3}>()
        width = Gather<axis = 0>(s, three)
        two = Constant<value = int64[1] {2}>()
        half = Div(width, two)
        start = Constant<value = int64[1] {0}>()
        stop = Constant<value = int64[1] {3}>()
        head = Slice(s, start, stop)
        target = Concat<axis = 0>(head, half, two)
        r = Reshape(c, target)
        y = MatMul(r, m)
    }''')
    model.graph.initializer.extend([weight("w", [8, 3, 3, 3]), weight("m", [2, 5])])
    return model


def test_macs_through_shape_arithmetic(monkeypatch):
    model = shape_arithmetic_model()
    per_pixel = 8 * 3 * 9 + 8 * 5  # the conv, then the MatMul's 5 outputs per pair of pixels x 2
    assert stats(model, {"x": [2, 3, 6, 10]})["macs"] == 2 * 6 * 10 * per_pixel
    assert stats(model)["macs"] == 1 * 32 * 32 * per_pixel  # default dims for a symbolic H, W
    # ONNX's inference alone leaves the MatMul unknown (the case the symbolic inference covers).
    monkeypatch.setattr(shapes, "_symbolic_inference", lambda model: {})
    assert stats(model, {"x": [2, 3, 6, 10]})["macs"] is None


def test_static_shapes_keep_symbolic_dims_unknown():
    static = infer_static(shape_arithmetic_model())
    assert static["c"] == (None, 8, None, None)
    assert static["y"][-1] == 5 and static["y"][0] is None


def test_macs_are_numbers_on_every_model_bundled_with_onnx():
    import glob

    corpus = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    paths = glob.glob(os.path.join(corpus, "light", "*.onnx")) + glob.glob(os.path.join(corpus, "*", "*", "model.onnx"))
    assert len(paths) > 100
    unknown = [path for path in paths if stats(onnx.load(path, load_external_data=False))["macs"] is None]
    assert unknown == []


class RecognitionHead:
    """A text-recognition-style net exported from PyTorch with dynamic batch and width: convs, a
    nearest upsample, then reshapes computed from the tensor's shape (a Div among them) and a
    Linear on the sequence. ONNX's own shape inference loses the sequence's shape."""

    @staticmethod
    def export(path: str) -> onnx.ModelProto:
        torch = pytest.importorskip("torch")
        nn, functional = torch.nn, torch.nn.functional

        class Head(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)
                self.fc = nn.Linear(64, 10)

            def forward(self, x):
                y = functional.interpolate(functional.relu(self.c2(functional.relu(self.c1(x)))), scale_factor=2.0)
                n, c, h, w = y.shape
                y = y.reshape(n, c * h, w // 2, 2).permute(0, 2, 1, 3).reshape(n, w // 2, -1)
                return self.fc(y[..., :64])

        torch.manual_seed(0)
        torch.onnx.export(Head().eval(), (torch.randn(1, 3, 8, 16),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 3: "width"}, "y": {0: "batch", 1: "steps"}})
        return onnx.load(path)


def test_macs_and_dynamic_dims_of_a_pytorch_export(tmp_path):
    import graphfold
    from tests.util import assert_same_outputs

    model = RecognitionHead.export(str(tmp_path / "head.onnx"))
    batch, width = 2, 24
    pixels = 8 * width
    # conv1 at full size, conv2 at stride 2, the upsample none, the Linear over width / 2 steps
    expected = batch * (pixels * 16 * 27 + pixels // 4 * 32 * 144 + (width // 2) * 10 * 64)
    folded, report = graphfold.fold(model, input_shapes={"x": [batch, 3, 8, width]})
    assert report.before["macs"] == report.after["macs"] == expected
    assert report.counts()["fold-constants"] > 0
    assert [d.dim_param for d in folded.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "", "width"]
    for shape in ([1, 3, 8, 16], [3, 3, 8, 40]):
        assert_same_outputs(model, folded, shapes={"x": shape})


def test_an_output_nothing_reads_needs_no_symbolic_inference(monkeypatch):
    # A Dropout mask (opset 9) that onnx's inference leaves without a shape: nobody reads it, so
    # the symbolic inference (sympy) is not worth its import; a read one would still call it.
    from graphfold import shapes

    calls = []
    monkeypatch.setattr(shapes, "_symbolic_inference", lambda model: calls.append(1) or {})
    model = model_from_text("""
        <ir_version: 4, opset_import: ["" : 9]>
        g (float[1, 4] x) => (float[1, 4] y) {
            y, mask = Dropout(x)
        }""")
    shapes.infer_static(model)
    assert calls == []
    read = model_from_text("""
        <ir_version: 4, opset_import: ["" : 9]>
        g (float[1, 4] x) => (float[1, 4] y, float[1, 4] m) {
            y, mask = Dropout(x)
            m = Identity(mask)
        }""")
    shapes.infer_static(read)
    assert calls == [1]
