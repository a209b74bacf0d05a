"""remove-identity-activations on 1-4 node graphs: identities go, anything that could change a value stays."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import graphfold
from graphfold.passes.activations import UNBOUNDED, tensor_dtype, value_range
from tests.util import Net, assert_declines, assert_folds, fold_only, model_from_text, op_types, run_ort

ACT = ["remove-identity-activations"]


def text_model(body: str, opset: int = 17) -> onnx.ModelProto:
    ir_version = 8 if opset >= 13 else 6 if opset >= 11 else 5
    return model_from_text(f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>\n' + body)


def assert_not_matched(model: onnx.ModelProto) -> None:
    """Not a candidate at all: no rewrite and nothing to explain."""
    folded, report = fold_only(model, ACT)
    assert report.rewrites == [] and report.declines == []
    assert op_types(folded) == op_types(model)


# --- unit slopes ------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", ["float[3,1,1] s = {1.0, 1.0, 1.0}", "float[1] s = {1.0}"],
                         ids=["per-channel", "shared"])
def test_prelu_with_unit_slope(slope):
    model = text_model(f'''g (float[N,3,4,4] x) => (float[N,3,4,4] y) <{slope}> {{
        [abs] a = Abs(x)
        [prelu] p = PRelu(a, s)
        [neg] y = Neg(p)
    }}''')
    _, report = assert_folds(model, ACT, 1, ["Abs", "Neg"], shapes={"x": [2, 3, 4, 4]})
    assert report.rewrites[0].nodes_removed == ["prelu"]


def test_prelu_writing_a_graph_output_keeps_its_name():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float[3] s = {1.0, 1.0, 1.0}> {
        [abs] a = Abs(x)
        [prelu] y = PRelu(a, s)
    }''')
    assert_folds(model, ACT, 1, ["Abs"])


def test_leaky_relu_with_alpha_one():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [abs] a = Abs(x)
        [leaky] y = LeakyRelu<alpha = 1.0>(a)
    }''')
    assert_folds(model, ACT, 1, ["Abs"])


# --- Relu and Clip whose input cannot reach the clipped range ----------------------------------

@pytest.mark.parametrize("before", [
    "r = Relu(x)",
    "r = Clip(x, zero, six)",
    "q = Relu(x)\n        r = MaxPool<kernel_shape = [2, 2]>(q)",
    "q = Relu(x)\n        r = AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>(q)",
    "q = Relu(x)\n        r = Resize<mode = \"linear\">(q, , scales)",
], ids=["relu", "relu6", "maxpool-of-relu", "avgpool-of-relu", "linear-resize-of-relu"])
def test_relu_after_a_nonnegative_input(before):
    model = text_model(f'''g (float[1,3,4,4] x) => (float[1,C,H,W] y)
            <float zero = {{0.0}}, float six = {{6.0}}, float[4] scales = {{1.0, 1.0, 2.0, 2.0}}> {{
        {before}
        [relu] y = Relu(r)
    }}''')
    ops = op_types(model)
    assert_folds(model, ACT, 1, ops[:-1])


@pytest.mark.parametrize("bounds", ["zero, six", "zero, ", "low, big"], ids=["same", "min-only", "wider"])
def test_clip_that_cannot_bind(bounds):
    model = text_model(f'''g (float[2,3] x) => (float[2,3] y)
            <float zero = {{0.0}}, float six = {{6.0}}, float low = {{-1.0}}, float big = {{8.0}}> {{
        [relu6] r = Clip(x, zero, six)
        [clip] y = Clip(r, {bounds})
    }}''')
    assert_folds(model, ACT, 1, ["Clip"])


def test_clip_with_attribute_bounds_at_opset_10():
    # Before opset 11, Clip took its bounds as attributes.
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [relu] r = Relu(x)
        [clip] y = Clip<min = 0.0>(r)
    }''', opset=10)
    assert_folds(model, ACT, 1, ["Relu"])


@pytest.mark.parametrize("opset", [11, 13])
def test_clip_with_input_bounds_at_opsets_11_and_13(opset):
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float zero = {0.0}, float six = {6.0}> {
        [relu6] r = Clip(x, zero, six)
        [relu] y = Relu(r)
    }''', opset=opset)
    assert_folds(model, ACT, 1, ["Clip"])


# --- neutral arithmetic -----------------------------------------------------------------------

@pytest.mark.parametrize("op, value, order", [
    ("Mul", "1.0", "xc"), ("Mul", "1.0", "cx"), ("Add", "0.0", "xc"), ("Add", "0.0", "cx"),
    ("Sub", "0.0", "xc"), ("Div", "1.0", "xc"),
])
def test_neutral_arithmetic(op, value, order):
    operands = "a, c" if order == "xc" else "c, a"
    model = text_model(f'''g (float[N,3,4] x) => (float[N,3,4] y) <float[3,1] c = {{{value}, {value}, {value}}}> {{
        [abs] a = Abs(x)
        [op] b = {op}({operands})
        [neg] y = Neg(b)
    }}''')
    assert_folds(model, ACT, 1, ["Abs", "Neg"], shapes={"x": [2, 3, 4]})


@pytest.mark.parametrize("op, value", [("Sub", "0.0"), ("Div", "1.0")])
def test_constant_first_sub_and_div_are_not_identities(op, value):
    # 0 - x and 1 / x: no candidate, nothing to decline.
    model = text_model(f'''g (float[2,3] x) => (float[2,3] y) <float c = {{{value}}}> {{
        [op] y = {op}(c, x)
    }}''')
    assert_not_matched(model)


def test_relu_with_an_unbounded_input_is_not_a_candidate():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [conv] y = Relu(x)
    }''')
    assert_not_matched(model)


# --- one test per decline reason --------------------------------------------------------------

def test_declines_prelu_slope_below_one():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float[3] s = {1.0, 0.95, 1.0}> {
        [abs] a = Abs(x)
        [prelu] y = PRelu(a, s)
    }''')
    assert_declines(model, ACT, "PRelu slopes are not all 1 (min 0.95); --snap-slope approximates")


def test_declines_prelu_slope_fed_at_run_time():
    model = text_model('''g (float[2,3] x, float[3] s) => (float[2,3] y) {
        [abs] a = Abs(x)
        [prelu] y = PRelu(a, s)
    }''')
    assert_declines(model, ACT, "PRelu slope is not constant")


def test_declines_prelu_slope_against_an_input_of_unknown_shape():
    model = text_model('''g (float x) => (float y) <float[3,1,1] s = {1.0, 1.0, 1.0}> {
        [abs] a = Abs(x)
        [prelu] y = PRelu(a, s)
    }''')
    assert_declines(model, ACT, "PRelu slope broadcasts its input larger")


def test_declines_leaky_relu_alpha_below_one():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) {
        [abs] a = Abs(x)
        [leaky] y = LeakyRelu<alpha = 0.1>(a)
    }''')
    assert_declines(model, ACT, "LeakyRelu alpha is 0.1, not 1")


def test_declines_relu_whose_input_can_be_negative():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float low = {-1.0}, float high = {1.0}> {
        [clip] c = Clip(x, low, high)
        [relu] y = Relu(c)
    }''')
    assert_declines(model, ACT, "Relu input can be negative")


def clip_around(between: str) -> onnx.ModelProto:
    """Clip(1, 2), then ``between`` (r -> s), then the same Clip again."""
    return text_model(f'''g (float[1,1,4,4] x) => (float[1,C,H,W] y)
            <float one = {{1.0}}, float two = {{2.0}}, float[4] scales = {{1.0, 1.0, 2.0, 2.0}}> {{
        [first] r = Clip(x, one, two)
        {between}
        [clip] y = Clip(s, one, two)
    }}''')


def test_declines_clip_after_a_padded_average_that_reaches_zero():
    model = clip_around("s = AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>(r)")
    assert_declines(model, ACT, "Clip bounds [1, 2] can bind on input range [0, 2]")


def test_declines_clip_after_a_crop_and_resize_that_extrapolates():
    model = clip_around('roi = Constant<value = float[8] {0.0, 0.0, -0.5, -0.5, 1.0, 1.0, 1.5, 1.5}>()\n'
                        '        s = Resize<mode = "linear", coordinate_transformation_mode = "tf_crop_and_resize", '
                        'extrapolation_value = 3.0>(r, roi, scales)')
    assert_declines(model, ACT, "Clip bounds [1, 2] can bind on input range [1, 3]")


def test_declines_clip_after_a_training_mode_dropout():
    # Training-mode Dropout scales what it keeps by 1 / (1 - ratio).
    model = clip_around('ratio = Constant<value = float {0.5}>()\n'
                        '        training = Constant<value = bool {1}>()\n'
                        '        s = Dropout(r, ratio, training)')
    assert_declines(model, ACT, "Clip bounds [1, 2] can bind on input range [0, inf]")


def test_clip_after_a_cubic_resize_is_not_a_candidate():
    # Cubic interpolation overshoots its samples: nothing is known about the range.
    assert_not_matched(clip_around('s = Resize<mode = "cubic">(r, , scales)'))


def test_declines_clip_that_can_bind():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float zero = {0.0}, float six = {6.0}> {
        [relu] r = Relu(x)
        [relu6] y = Clip(r, zero, six)
    }''')
    assert_declines(model, ACT, "Clip bounds [0, 6] can bind on input range [0, inf]")


def test_declines_clip_on_an_input_range_beyond_its_bounds():
    # Everything is clipped to 6, so the second Clip(10, 20) sees [6, 6] and binds.
    model = text_model('''g (float[2,3] x) => (float[2,3] y)
            <float zero = {0.0}, float six = {6.0}, float ten = {10.0}, float twenty = {20.0}> {
        [first] a = Clip(x, ten, twenty)
        [relu6] b = Clip(a, zero, six)
        [last] y = Clip(b, ten, twenty)
    }''')
    report = assert_declines(model, ACT, "Clip bounds [10, 20] can bind on input range [6, 6]")
    assert "Clip bounds [0, 6] can bind on input range [10, 20]" in [d.reason for d in report.declines]


def test_declines_clip_bounds_fed_at_run_time():
    model = text_model('''g (float[2,3] x, float high) => (float[2,3] y) <float zero = {0.0}> {
        [relu] r = Relu(x)
        [clip] y = Clip(r, zero, high)
    }''')
    assert_declines(model, ACT, "Clip bounds are not constant")


def test_declines_a_constant_that_grows_the_shape():
    model = text_model('''g (float[2,3] x) => (float[4,2,3] y) <float[4,1,1] c = {0.0, 0.0, 0.0, 0.0}> {
        [add] y = Add(x, c)
    }''')
    assert_declines(model, ACT, "Add constant broadcasts its input to a larger shape")


def test_declines_a_one_element_constant_on_a_scalar():
    # x * [1] is [1] for a rank-0 x: removing the Mul would change the output's shape.
    n = Net([])
    n.op("Mul", [n.op("Abs", ["x"], "a"), n.const("one", np.ones([1], np.float32))], "y")
    assert_declines(n.model("y"), ACT, "Mul constant broadcasts its input to a larger shape")


def test_declines_a_constant_of_another_dtype():
    # Only a broken model has this (ONNX requires equal types): build it unchecked, never run it.
    value = helper.make_tensor("c", onnx.TensorProto.DOUBLE, [], [1.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["y"], name="mul")], "test",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], [value])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = fold_only(model, ACT)
    assert report.rewrites == []
    assert [d.reason for d in report.declines] == ["Mul constant has another dtype than its input"]


def test_declines_when_input_and_output_are_both_graph_outputs():
    model = text_model('''g (float[2,3] x) => (float[2,3] r, float[2,3] y) {
        [relu] r = Relu(x)
        [again] y = Relu(r)
    }''')
    assert_declines(model, ACT, "'r' and 'y' are both graph outputs")


def test_declines_when_a_graph_output_would_become_a_graph_input():
    model = text_model('''g (float[2,3] x) => (float[2,3] y) <float one = {1.0}> {
        [mul] y = Mul(x, one)
    }''')
    assert_declines(model, ACT, "graph output 'y' would become a graph input or constant")


# --- ranges respect dtype and output: regressions from review ---------------------------------

def test_relu_after_abs_on_int8_keeps_its_relu():
    # Abs(-128) = -128 in int8: the Relu still has work to do there.
    model = text_model('''g (int8[2,3] x) => (int8[2,3] y) {
        [abs] a = Abs(x)
        [relu] y = Relu(a)
    }''')
    folded, report = graphfold.fold(model)  # validated, on integer inputs that include -128
    assert op_types(folded) == ["Abs", "Relu"], [r.detail for r in report.rewrites]
    feeds = {"x": np.array([[-128, -1, 0], [1, 127, -127]], np.int8)}
    np.testing.assert_array_equal(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])


@pytest.mark.parametrize("dtype", ["float", "double"])
def test_relu_after_abs_without_wrap_around_is_removed(dtype):
    model = text_model(f'''g ({dtype}[2,3] x) => ({dtype}[2,3] y) {{
        [abs] a = Abs(x)
        [neg] y = Relu(a)
    }}''')
    assert_folds(model, ACT, 1, ["Abs"])


def test_relu_after_abs_of_a_relu_on_int8_is_removed():
    # Relu's output never holds -128, so Abs cannot wrap.
    model = text_model('''g (int8[2,3] x) => (int8[2,3] y) {
        [r] r = Relu(x)
        [abs] a = Abs(r)
        [relu] y = Relu(a)
    }''')
    folded, report = fold_only(model, ACT)
    assert op_types(folded) == ["Relu", "Abs"]


def test_clip_on_maxpool_indices_keeps_its_clip():
    # The pooled values lie in [0, 1] (a Sigmoid's); the indices do not.
    model = text_model('''g (float[1,2,4,4] x) => (float[1,2,2,2] p, int64[1,2,2,2] y)
        <int64 lo = {0}, int64 hi = {1}> {
        [sig] s = Sigmoid(x)
        [pool] p, i = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(s)
        [clip] y = Clip(i, lo, hi)
    }''')
    folded, report = graphfold.fold(model, check=False)
    assert "Clip" in op_types(folded), [r.detail for r in report.rewrites]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(folded, feeds)[1], run_ort(model, feeds)[1])


def test_ranges_of_maxpool_and_topk_indices_are_their_own():
    # Indices are never negative, whatever the values are; a Dropout's mask has no range.
    model = text_model('''g (float[1,2,4,4] x) => (int64[1,2,2,2] i, int64[1,2,2,4] j, bool[1,2,4,4] m)
        <int64[1] k = {2}, float ratio = {0.5}, bool train = {1}> {
        [sig] s = Sigmoid(x)
        [pool] p, i = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(s)
        [topk] v, j = TopK<axis = 2>(s, k)
        [drop] d, m = Dropout(s, ratio, train)
    }''')
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    assert value_range(tensors["p"]) == value_range(tensors["v"]) == (0.0, 1.0)
    assert value_range(tensors["i"]) == value_range(tensors["j"]) == (0.0, math.inf)
    assert value_range(tensors["m"]) == UNBOUNDED
    assert tensor_dtype(tensors["j"]) == np.int64


@pytest.mark.parametrize("op", ["Split", "TopK"])
def test_relu_after_split_or_topk_values_of_a_relu_is_removed(op):
    node = "t, u = Split<axis = 2, num_outputs = 2>(r)" if op == "Split" else "u, t = TopK<axis = 2>(r, k)"
    model = text_model(f'''g (float[1,2,4,4] x) => (float[1,2,2,4] y) <int64[1] k = {{2}}> {{
        [r] r = Relu(x)
        [node] {node}
        [relu] y = Relu(u)
    }}''', opset=18)
    assert_folds(model, ACT, 1, ["Relu", op])


def test_relu_after_topk_indices_of_values_in_range_keeps_nothing_wrong():
    # TopK's second output is indices even when its values are a Sigmoid's: Clip(0, 1) binds.
    model = text_model('''g (float[1,2,4,4] x) => (int64[1,2,2,4] y, float[1,2,2,4] v)
        <int64[1] k = {2}, int64 lo = {0}, int64 hi = {1}> {
        [sig] s = Sigmoid(x)
        [topk] v, i = TopK<axis = 2>(s, k)
        [clip] y = Clip(i, lo, hi)
    }''')
    folded, report = fold_only(model, None)
    assert "Clip" in op_types(folded), [r.detail for r in report.rewrites]
