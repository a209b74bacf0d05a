"""The clean-up passes on 1-5 node graphs: fold-constants, remove-identity, remove-dead-nodes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from tests.util import assert_same_outputs, fold_only, make_model, model_from_text, op_types, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def text_model(body: str) -> onnx.ModelProto:
    return model_from_text(HEADER + body)


def rewrites_of(report, pass_name: str) -> list:
    return [r for r in report.rewrites if r.pass_name == pass_name]


def reasons(report) -> list[str]:
    return [d.reason for d in report.declines]


def assert_idempotent(model: onnx.ModelProto, passes) -> None:
    _, again = fold_only(model, passes)
    assert again.rewrites == [], [r.detail for r in again.rewrites]


# --- fold-constants ---------------------------------------------------------------------------

def test_fold_constants_evaluates_a_constant_subgraph():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [c] c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        [twice] d = Add(c, c)
        [add] y = Add(x, d)
    }''')
    folded, report = fold_only(model, ["fold-constants"])
    [rewrite] = report.rewrites
    assert rewrite.pass_name == "fold-constants" and rewrite.exact
    assert sorted(rewrite.nodes_removed) == ["c", "twice"]
    assert "2 constant node" in rewrite.detail
    assert op_types(folded) == ["Add"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["fold-constants"])


def test_fold_constants_result_that_is_a_graph_output():
    model = text_model('''g (float[2] x) => (float[2] y, float[2] z) {
        y = Relu(x)
        c = Constant<value = float[2] {1.0, 2.0}>()
        z = Add(c, c)
    }''')
    folded, report = fold_only(model, ["fold-constants"])
    assert len(report.rewrites) == 1
    assert op_types(folded) == ["Relu"]
    assert [o.name for o in folded.graph.output] == ["y", "z"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["fold-constants"])


def test_fold_constants_leaves_random_generators():
    model = text_model('''g (float[2] x) => (float[2] y) {
        r = RandomNormal<shape = [2], seed = 1.0>()
        y = Add(x, r)
    }''')
    folded, report = fold_only(model, ["fold-constants"])
    assert report.rewrites == []
    assert op_types(folded) == ["RandomNormal", "Add"]


def test_fold_constants_declines_a_result_over_the_size_limit():
    # 4096 x 4096 float32 is 64 MiB: folding would turn a cheap generator into a huge initializer.
    model = text_model('''g (float[2] x) => (float[4096,4096] y) {
        s = Constant<value = int64[2] {4096, 4096}>()
        y = ConstantOfShape<value = float[1] {1.0}>(s)
    }''')
    folded, report = fold_only(model, ["fold-constants"])
    assert [r.detail for r in rewrites_of(report, "fold-constants")] == ["folded 1 constant node(s)"]
    assert "ConstantOfShape" in op_types(folded)
    assert reasons(report) == ["result is 64 MiB, over the 16 MiB constant-folding limit"]
    assert_idempotent(folded, ["fold-constants"])


def test_fold_constants_declines_what_graphsurgeon_leaves_unfolded(monkeypatch):
    # A candidate the evaluator gives up on is no rewrite, not one "rewrite" per round.
    monkeypatch.setattr(gs.Graph, "fold_constants", lambda self, **kw: self)
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        d = Sqrt(c)
        y = Add(x, d)
    }''')
    folded, report = fold_only(model, ["fold-constants"])
    assert report.rewrites == []
    assert reasons(report) == ["onnxruntime could not evaluate these constant nodes"]
    assert op_types(folded) == ["Constant", "Sqrt", "Add"]


# --- fold-constants: shape arithmetic ---------------------------------------------------------

FLATTEN = '''g (float[{batch},4,3,2] x) => (float[{batch},24] y) {{
        s = Shape(x)
        i0 = Constant<value = int64 {{0}}>()
        n = Gather<axis = 0>(s, i0)
        i1 = Constant<value = int64 {{1}}>()
        c = Gather<axis = 0>(s, i1)
        i2 = Constant<value = int64 {{2}}>()
        h = Gather<axis = 0>(s, i2)
        i3 = Constant<value = int64 {{3}}>()
        w = Gather<axis = 0>(s, i3)
        ch = Mul(c, h)
        chw = Mul(ch, w)
        a0 = Constant<value = int64[1] {{0}}>()
        n1 = Unsqueeze(n, a0)
        chw1 = Unsqueeze(chw, a0)
        target = Concat<axis = 0>(n1, chw1)
        y = Reshape(x, target)
    }}'''


def test_fold_constants_folds_shape_arithmetic_on_static_dims():
    model = text_model(FLATTEN.format(batch=2))
    folded, report = fold_only(model, ["fold-constants"])
    assert op_types(folded) == ["Reshape"]
    [target] = [init for init in folded.graph.initializer if init.name == folded.graph.node[0].input[1]]
    assert list(onnx.numpy_helper.to_array(target)) == [2, 24]
    # Every node but the Reshape was folded, and the summary counts them all.
    assert report.counts()["fold-constants"] == len(model.graph.node) - 1
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["fold-constants"])


@pytest.mark.parametrize("shapes", [None, {"x": [3, 4, 3, 2]}])
def test_fold_constants_keeps_a_symbolic_batch_dynamic(shapes):
    # --input-shape resolves shapes for validation and statistics; it never specializes the model.
    model = text_model(FLATTEN.format(batch="N"))
    folded, _ = fold_only(model, ["fold-constants"], input_shapes=shapes)
    ops = op_types(folded)
    assert ops.count("Shape") == 1 and ops.count("Gather") == 1 and "Mul" not in ops
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 3):
        assert_same_outputs(model, folded, shapes={"x": [batch, 4, 3, 2]})


def test_fold_constants_reads_no_dims_off_a_shape_with_start():
    # graphsurgeon's shape folding ignores Shape's start/end (opset 15): such a Shape is left to
    # ordinary folding, which cannot fold it on a non-constant input.
    model = text_model('''g (float[2,4,3] x) => (float[2,12] y) {
        s = Shape<start = 1>(x)
        p = ReduceProd<keepdims = 1>(s)
        b = Constant<value = int64[1] {2}>()
        t = Concat<axis = 0>(b, p)
        y = Reshape(x, t)
    }''')
    folded, _ = fold_only(model, ["fold-constants"])
    assert "Shape" in op_types(folded)
    assert_same_outputs(model, folded)


def test_fold_constants_keeps_float_shape_arithmetic_exact():
    # graphsurgeon would compute Cast(float) * 0.5 -> Cast(int64) in integers, with 0.5 cast to 0.
    model = text_model('''g (float[N,4] x) => (float[N,2,2] y) <int64 c, float cf, float hf, int64 h> {
        s = Shape(x)
        i = Constant<value = int64 {1}>()
        c = Gather<axis = 0>(s, i)
        cf = Cast<to = 1>(c)
        half = Constant<value = float {0.5}>()
        hf = Mul(cf, half)
        h = Cast<to = 7>(hf)
        a0 = Constant<value = int64[1] {0}>()
        h1 = Unsqueeze(h, a0)
        m1 = Constant<value = int64[2] {-1, 2}>()
        t = Concat<axis = 0>(m1, h1)
        y = Reshape(x, t)
    }''')
    folded, _ = fold_only(model, ["fold-constants"])
    assert "Shape" not in op_types(folded)
    for batch in (1, 3):
        assert_same_outputs(model, folded, shapes={"x": [batch, 4]})


# --- remove-identity --------------------------------------------------------------------------

REARRANGING = [
    # (opset, the constant's shape, nodes from c to r): cases onnxruntime evaluates alike.
    (11, [3, 1, 2], "r = Unsqueeze<axes = [0, -1]>(c)"),
    (17, [3, 1, 2], "a = Constant<value = int64[2] {-1, 1}>()\n r = Unsqueeze(c, a)"),
    (11, [3, 1, 2], "r = Squeeze<axes = [-2]>(c)"),
    (17, [1, 3, 1, 2], "r = Squeeze(c)"),
    (17, [1, 3, 1, 2], "a = Constant<value = int64[1] {0}>()\n r = Squeeze(c, a)"),
    (17, [3, 4, 2], "t = Constant<value = int64[3] {0, -1, 1}>()\n r = Reshape(c, t)"),
    (17, [3, 4, 2], "t = Constant<value = int64[2] {4, 6}>()\n r = Reshape<allowzero = 1>(c, t)"),
    (17, [3, 4, 2], "r = Flatten<axis = -1>(c)"),
    (17, [3, 4, 2], "r = Flatten<axis = 0>(c)"),
    (17, [3, 4, 2], "r = Transpose(c)"),
    (17, [3, 4, 2], "r = Transpose<perm = [1, 2, 0]>(c)"),
    (17, [3, 4, 2], "t = Transpose<perm = [1, 2, 0]>(c)\n i = Identity(t)\n f = Flatten(i)\n r = Unsqueeze(f, s)"),
]


@pytest.mark.parametrize("opset, shape, body", REARRANGING)
def test_fold_constants_rearranges_constants_without_onnxruntime(monkeypatch, opset, shape, body):
    # Nodes that only move a constant's values around are computed in numpy, no session opened;
    # the result is the runtime's, element for element and in dtype.
    from graphfold.passes import cleanup

    def no_session(ctx):
        raise AssertionError("onnxruntime was asked")

    values = ", ".join(str(v) for v in range(int(np.prod(shape))))
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1] x) => (int32 y) {{
        c = Constant<value = int32[{",".join(map(str, shape))}] {{{values}}}>()
        s = Constant<value = int64[1] {{1}}>()
        {body}
        y = Identity(r)
    }}""")
    model.graph.output[0].type.tensor_type.ClearField("shape")  # whatever the nodes make
    feeds = {"x": np.zeros(1, np.float32)}
    expected = run_ort(model, feeds)[0]
    monkeypatch.setattr(cleanup, "_evaluate", no_session)
    folded, report = fold_only(model, ["fold-constants"])
    assert rewrites_of(report, "fold-constants")
    got = run_ort(folded, feeds)[0]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_fold_constants_gives_arithmetic_to_onnxruntime(monkeypatch):
    # One node that computes (an Add) sends the whole set to onnxruntime, as before.
    from graphfold.passes import cleanup

    asked = []
    real = cleanup._evaluate
    monkeypatch.setattr(cleanup, "_evaluate", lambda ctx: asked.append(1) or real(ctx))
    model = text_model("""g (float[2,3] x) => (float[2,3] y) {
        c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        a = Constant<value = int64[1] {0}>()
        u = Unsqueeze(c, a)
        d = Add(u, u)
        y = Add(x, d)
    }""")
    folded, _ = fold_only(model, ["fold-constants"])
    assert asked and op_types(folded) == ["Add"]
    assert_same_outputs(model, folded)


def test_remove_identity_chain():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        a = Relu(x)
        [id1] b = Identity(a)
        [id2] c = Identity(b)
        y = Sigmoid(c)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert [r.nodes_removed for r in report.rewrites] == [["id1"], ["id2"]]
    assert all(r.exact for r in report.rewrites)
    assert op_types(folded) == ["Relu", "Sigmoid"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["remove-identity"])


def test_remove_identity_keeps_the_graph_output_name():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        a = Relu(x)
        y = Identity(a)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert len(report.rewrites) == 1
    assert op_types(folded) == ["Relu"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["remove-identity"])


def test_remove_identity_output_name_kept_when_the_source_has_other_readers():
    model = text_model('''g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
        a = Relu(x)
        y = Identity(a)
        z = Neg(a)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert len(report.rewrites) == 1
    assert op_types(folded) == ["Relu", "Neg"]
    assert [o.name for o in folded.graph.output] == ["y", "z"]
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("identity_is_output", [False, True])
def test_remove_identity_whose_tensors_a_subgraph_reads(identity_is_output):
    # The If branches read the Identity's input (or output) by name from the outer graph.
    shape = [2, 3]
    read = "a" if identity_is_output else "b"
    branches = {f"{kind}_branch": helper.make_graph(
        [helper.make_node(op, [read], [kind])], kind, [],
        [helper.make_tensor_value_info(kind, TensorProto.FLOAT, shape)])
        for kind, op in (("then", "Neg"), ("else", "Relu"))}
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)]
    if identity_is_output:
        outputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, shape))
    model = make_model(
        [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
         helper.make_node("If", ["cond"], ["z"], **branches)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], outputs)
    folded, report = fold_only(model, ["remove-identity"])
    assert len(report.rewrites) == 1
    assert op_types(folded) == ["Sigmoid", "If"]
    onnx.checker.check_model(folded, full_check=True)
    for cond in (True, False):
        feeds = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(shape), "cond": np.array(cond)}
        for ref, out in zip(run_ort(model, feeds), run_ort(folded, feeds)):
            np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("dropout", [
    "d = Dropout(a)",
    "d = Dropout(a, ratio)",
    "d = Dropout(a, ratio, off)",
    "d, mask = Dropout(a)",  # the mask exists but nobody reads it
])
def test_remove_inference_dropout(dropout):
    model = text_model(f'''g (float[2,3] x) => (float[2,3] y) <float ratio = {{0.5}}, bool off = {{0}}> {{
        a = Relu(x)
        {dropout}
        y = Sigmoid(d)
    }}''')
    folded, report = fold_only(model, ["remove-identity"])
    assert len(report.rewrites) == 1
    assert op_types(folded) == ["Relu", "Sigmoid"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["remove-identity"])


def test_remove_identity_declines_dropout_whose_mask_is_used():
    model = text_model('''g (float[2,3] x) => (float[2,3] y, bool[2,3] m) {
        a = Relu(x)
        d, m = Dropout(a)
        y = Sigmoid(d)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert report.rewrites == []
    assert reasons(report) == ["Dropout's mask output is used"]
    assert op_types(folded) == ["Relu", "Dropout", "Sigmoid"]


@pytest.mark.parametrize("fed", [False, True], ids=["constant-true", "fed-at-run-time"])
def test_remove_identity_declines_dropout_that_may_train(fed):
    inputs = "float[2,3] x, bool train" if fed else "float[2,3] x"
    initializers = "<float ratio = {0.5}>" if fed else "<float ratio = {0.5}, bool train = {1}>"
    model = text_model(f'''g ({inputs}) => (float[2,3] y) {initializers} {{
        a = Relu(x)
        d = Dropout(a, ratio, train)
        y = Sigmoid(d)
    }}''')
    folded, report = fold_only(model, ["remove-identity"])
    assert report.rewrites == []
    assert reasons(report) == ["Dropout may run in training mode"]
    assert "Dropout" in op_types(folded)


def test_remove_identity_declines_when_both_ends_are_graph_outputs():
    model = text_model('''g (float[2,3] x) => (float[2,3] a, float[2,3] y) {
        a = Relu(x)
        y = Identity(a)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert report.rewrites == []
    assert reasons(report) == ["'a' and 'y' are both graph outputs"]
    assert_same_outputs(model, folded)


def test_remove_identity_declines_turning_an_input_into_an_output():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        y = Identity(x)
    }''')
    folded, report = fold_only(model, ["remove-identity"])
    assert report.rewrites == []
    assert reasons(report) == ["graph output 'y' would become a graph input or constant"]
    assert op_types(folded) == ["Identity"]


# --- remove-dead-nodes ------------------------------------------------------------------------

def test_remove_dead_chain():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [relu] a = Relu(x)
        [neg] b = Neg(a)
        y = Sigmoid(x)
    }''')
    folded, report = fold_only(model, ["remove-dead-nodes"])
    assert sorted(r.nodes_removed[0] for r in report.rewrites) == ["neg", "relu"]
    assert op_types(folded) == ["Sigmoid"]
    assert_same_outputs(model, folded)
    assert_idempotent(folded, ["remove-dead-nodes"])


def test_remove_dead_keeps_nodes_read_by_a_subgraph():
    shape = [2, 3]
    then_graph = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)])
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    folded, report = fold_only(model, ["remove-dead-nodes"])
    assert report.rewrites == []
    assert op_types(folded) == ["Relu", "If"]
    for cond in (True, False):
        feeds = {"x": np.arange(6, dtype=np.float32).reshape(shape) - 3, "cond": np.array(cond)}
        np.testing.assert_array_equal(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])


def test_remove_dead_keeps_a_node_with_one_used_output():
    model = text_model('''g (float[4] x) => (float[2] y) <int64[2] sizes = {2, 2}> {
        a, b = Split(x, sizes)
        y = Relu(a)
    }''')
    folded, report = fold_only(model, ["remove-dead-nodes"])
    assert report.rewrites == []
    assert op_types(folded) == ["Split", "Relu"]


# --- the clean-up passes together -------------------------------------------------------------

def test_cleanup_pipeline_reaches_a_fixed_point():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        d = Identity(c)
        a = Add(x, d)
        b = Dropout(a)
        dead = Neg(b)
        y = Identity(b)
    }''')
    passes = ["fold-constants", "remove-identity", "remove-dead-nodes"]
    folded, report = fold_only(model, passes)
    assert op_types(folded) == ["Add"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert report.declines == []
    assert_same_outputs(model, folded)
    assert_idempotent(folded, passes)
