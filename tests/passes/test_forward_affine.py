"""fold-affine-forward on 1-5 node graphs: a scale or shift folds into the layers reading it, exactly,
and each decline says why."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold.passes import DEFAULT_PIPELINE
from tests.util import Net, assert_declines, assert_folds, assert_same_outputs, fold_only, make_model, op_types

FORWARD = ["fold-affine-forward"]
CHANNELS = 6


def affine(n: Net, op: str, x: str, out: str, value: np.ndarray, const_first: bool = False) -> str:
    const = n.const(f"{out}.c", np.asarray(value, np.float32))
    return n.op(op, [const, x] if const_first else [x, const], out)


def channel_vector(n: Net, low: float = 0.5) -> np.ndarray:
    return n.rng.uniform(low, low + 1.5, (1, CHANNELS, 1, 1)).astype(np.float32)


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_scale_folds_into_a_padded_conv(op, per_channel):
    n = Net([1, CHANNELS, 9, 9])
    value = channel_vector(n) if per_channel else np.float32(6.0)
    s = affine(n, op, n.x, "s", value)
    model = n.model(n.conv(s, "y", CHANNELS, 4, kernel=3, pads=[1, 1, 1, 1], strides=[2, 2]))
    assert_folds(model, FORWARD, 1, ["Conv"])


@pytest.mark.parametrize("op,const_first", [("Add", False), ("Add", True), ("Sub", False), ("Sub", True)])
def test_shift_folds_into_an_unpadded_conv_bias(op, const_first):
    n = Net([1, CHANNELS, 9, 9])
    s = affine(n, op, n.x, "s", n.rng.standard_normal((CHANNELS, 1, 1)), const_first)
    model = n.model(n.conv(s, "y", CHANNELS, 4, kernel=3, bias=False))
    folded, _ = assert_folds(model, FORWARD, 1, ["Conv"])
    assert len(folded.graph.node[0].input) == 3  # the shift made a bias


def test_hand_built_hardswish_division_folds_into_the_next_conv():
    """x * Relu6(x + 3) / 6 before a 1x1 conv (PP-OCR): the Div goes, the activation stays."""
    n = Net([1, CHANNELS, 8, 8])
    a = n.op("Add", [n.x, n.const("three", np.float32(3))], "a")
    c = n.op("Clip", [a, n.const("lo", np.float32(0)), n.const("hi", np.float32(6))], "c")
    m = n.op("Mul", [n.x, c], "m")
    d = n.op("Div", [m, n.const("six", np.float32(6))], "d")
    model = n.model(n.conv(d, "y", CHANNELS, 8, kernel=1))
    assert_folds(model, FORWARD, 1, ["Add", "Clip", "Mul", "Conv"])


def test_learnable_scale_and_shift_both_fold_into_a_pointwise_conv():
    """PP-LCNetV3's learnable affine block (Mul then Add) before a 1x1 conv."""
    n = Net([1, CHANNELS, 8, 8])
    h = n.op("HardSwish", [n.x], "h")
    s = affine(n, "Mul", h, "s", np.float32(1.3))
    t = affine(n, "Add", s, "t", np.float32(-0.2))
    model = n.model(n.conv(t, "y", CHANNELS, 8, kernel=1))
    assert_folds(model, FORWARD, 2, ["HardSwish", "Conv"])


@pytest.mark.parametrize("shift_op", ["Add", "Sub"])
def test_scale_moves_past_a_shift_into_a_padded_depthwise_conv(shift_op):
    """s*x + t = s*(x + t/s): the shift cannot enter the padded conv, the scale can."""
    n = Net([1, CHANNELS, 8, 8])
    s = affine(n, "Mul", n.x, "s", channel_vector(n))
    t = affine(n, shift_op, s, "t", n.rng.standard_normal((1, CHANNELS, 1, 1)))
    model = n.model(n.conv(t, "y", CHANNELS, CHANNELS, kernel=3, group=CHANNELS, pads=[1, 1, 1, 1]))
    assert_folds(model, FORWARD, 1, ["Add", "Conv"])


@pytest.mark.parametrize("group", [2, CHANNELS])
def test_scale_folds_into_a_grouped_or_depthwise_conv(group):
    n = Net([1, CHANNELS, 8, 8])
    s = affine(n, "Mul", n.x, "s", channel_vector(n))
    model = n.model(n.conv(s, "y", CHANNELS, CHANNELS, kernel=3, group=group, pads=[1, 1, 1, 1]))
    assert_folds(model, FORWARD, 1, ["Conv"])


def test_shift_folds_into_an_unpadded_grouped_conv():
    n = Net([1, CHANNELS, 8, 8])
    s = affine(n, "Add", n.x, "s", n.rng.standard_normal((1, CHANNELS, 1, 1)))
    model = n.model(n.conv(s, "y", CHANNELS, CHANNELS, kernel=3, group=3))
    assert_folds(model, FORWARD, 1, ["Conv"])


def test_every_reader_takes_the_map():
    n = Net([1, CHANNELS, 8, 8])
    s = affine(n, "Mul", n.x, "s", channel_vector(n))
    shift = affine(n, "Add", s, "t", n.rng.standard_normal((1, CHANNELS, 1, 1)))
    y1 = n.conv(shift, "y1", CHANNELS, 4, kernel=1)
    y2 = n.conv(shift, "y2", CHANNELS, 5, kernel=1, group=1)
    model = n.model(y1, y2)
    assert_folds(model, FORWARD, 2, ["Conv", "Conv"])


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0)])
def test_scale_and_shift_fold_into_a_gemm(trans_a, trans_b):
    n = Net([5, 3] if trans_a else [3, 5])
    vector = n.rng.uniform(0.5, 2, (5, 1) if trans_a else (5,)).astype(np.float32)
    s = affine(n, "Mul", n.x, "s", vector)
    t = affine(n, "Sub", s, "t", vector * 0.3)
    w = n.random("w", [4, 5] if trans_b else [5, 4])
    model = n.model(n.op("Gemm", [t, w, n.random("b", [4])], "y", transA=trans_a, transB=trans_b,
                         alpha=0.5, beta=2.0))
    assert_folds(model, FORWARD, 2, ["Gemm"])


def test_shift_into_a_rank2_matmul_makes_a_gemm():
    n = Net([3, 5])
    t = affine(n, "Add", n.x, "t", n.rng.standard_normal(5))
    model = n.model(n.op("MatMul", [t, n.random("w", [5, 4])], "y"))
    assert_folds(model, FORWARD, 1, ["Gemm"])


def test_scale_into_a_rank3_matmul():
    n = Net([2, 3, 5])
    s = affine(n, "Mul", n.x, "s", n.rng.uniform(0.5, 2, 5))
    model = n.model(n.op("MatMul", [s, n.random("w", [5, 4])], "y"))
    assert_folds(model, FORWARD, 1, ["MatMul"])


def test_default_pipeline_runs_the_pass():
    assert "fold-affine-forward" in [p.name for p in DEFAULT_PIPELINE]
    n = Net([1, CHANNELS, 8, 8])
    r = n.op("Relu", [n.x], "r")
    s = affine(n, "Div", r, "s", np.float32(6.0))
    model = n.model(n.conv(s, "y", CHANNELS, 4, kernel=1))
    folded, report = fold_only(model, None)
    assert op_types(folded) == ["Relu", "Conv"]
    assert [r.pass_name for r in report.rewrites] == FORWARD
    assert_same_outputs(model, folded)


def test_backward_fold_is_preferred_when_the_producer_is_a_conv():
    n = Net([1, CHANNELS, 8, 8])
    c = n.conv(n.x, "c", CHANNELS, CHANNELS, kernel=1)
    s = affine(n, "Mul", c, "s", channel_vector(n))
    model = n.model(n.conv(s, "y", CHANNELS, 4, kernel=1))
    _, report = fold_only(model, ["fold-affine", "fold-affine-forward"])
    assert [r.pass_name for r in report.rewrites] == ["fold-affine"]


# --- declines, one per reason -----------------------------------------------------------------

def scaled_conv(shape=(1, CHANNELS, 8, 8), op="Mul", value=None, **conv) -> Net:
    n = Net(list(shape))
    affine(n, op, n.x, "s", np.float32(2.0) if value is None else value)
    return n


def test_declines_a_map_that_is_a_graph_output():
    n = scaled_conv()
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=1), "s")
    assert_declines(model, FORWARD, "'s' is a graph output")


def test_declines_when_one_reader_cannot_take_it():
    n = scaled_conv()
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=1), n.op("Relu", ["s"], "r"))
    assert_declines(model, FORWARD, "also read by Relu 'r'")


def test_declines_a_shift_into_a_padded_conv():
    n = scaled_conv(op="Add")
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=3, pads=[1, 1, 1, 1]))
    assert_declines(model, FORWARD, "is padded: a shift would leak into its zero border")


def test_declines_moving_a_zero_scale_past_a_shift():
    value = np.ones((1, CHANNELS, 1, 1), np.float32)
    value[0, 1] = 0
    n = scaled_conv(value=value)
    affine(n, "Add", "s", "t", np.float32(0.5))
    model = n.model(n.conv("t", "y", CHANNELS, 4, kernel=3, pads=[1, 1, 1, 1]))
    assert_declines(model, FORWARD, "the scale cannot move past the shift")


def test_declines_a_shift_into_a_conv_padded_automatically_on_an_unknown_size():
    n = scaled_conv(shape=(1, CHANNELS, "h", "w"), op="Add")
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=3, auto_pad="SAME_UPPER"))
    assert_declines(model, FORWARD, "pads automatically and the input size is unknown")


def test_declines_a_map_read_as_a_weight():
    n = Net([4, 4])
    s = affine(n, "Mul", n.x, "s", np.float32(2.0))
    model = n.model(n.op("MatMul", [n.random("a", [3, 4]), s], "y"))
    assert_declines(model, FORWARD, "reads 's' as a weight")


def test_declines_a_weight_fed_at_run_time():
    n = scaled_conv()
    w = n.input("w", [4, CHANNELS, 1, 1])
    model = n.model(n.op("Conv", ["s", w], "y"))
    assert_declines(model, FORWARD, "weight is not a float constant")


def test_declines_a_constant_that_varies_along_space():
    n = scaled_conv(value=np.linspace(1, 2, 8, dtype=np.float32).reshape(1, 1, 1, 8))
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=1))
    assert_declines(model, FORWARD, "is not a per-channel vector")


def test_declines_a_constant_that_broadcasts_the_input_larger():
    n = scaled_conv(shape=(1, 1, 8, 8), value=np.ones((1, CHANNELS, 1, 1), np.float32) * 2)
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=1))
    assert_declines(model, FORWARD, "is not a per-channel vector")


def test_declines_a_division_by_zero():
    value = np.ones((1, CHANNELS, 1, 1), np.float32)
    value[0, 2] = 0
    n = scaled_conv(op="Div", value=value)
    model = n.model(n.conv("s", "y", CHANNELS, 4, kernel=1))
    assert_declines(model, FORWARD, "not finite")


def test_declines_a_shift_before_a_rank3_matmul():
    n = Net([2, 3, 5])
    t = affine(n, "Add", n.x, "t", n.rng.standard_normal(5))
    model = n.model(n.op("MatMul", [t, n.random("w", [5, 4])], "y"))
    assert_declines(model, FORWARD, "has no bias to go into")


def test_declines_a_matmul_input_of_unknown_rank():
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="r"),
             helper.make_node("Mul", ["r", "k"], ["s"], name="s"), helper.make_node("MatMul", ["s", "w"], ["y"], name="y")]
    inits = [numpy_helper.from_array(np.float32(2.0), "k"), numpy_helper.from_array(np.ones((5, 4), np.float32), "w")]
    # A Reshape to a run-time shape of unknown length: nobody knows r's rank.
    model = make_model(nodes, [value("x", TensorProto.FLOAT, [3, 5]), value("shape", TensorProto.INT64, ["n"])],
                       [value("y", TensorProto.FLOAT, ["a", 4])], inits)
    assert_declines(model, FORWARD, "rank of MatMul 'y''s input is unknown")


def test_declines_float16_weights_that_would_overflow():
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Mul", ["x", "k"], ["s"], name="s"), helper.make_node("Conv", ["s", "w"], ["y"], name="y")]
    inits = [numpy_helper.from_array(np.full((1, 2, 1, 1), 300.0, np.float16), "k"),
             numpy_helper.from_array(np.full((2, 2, 1, 1), 300.0, np.float16), "w")]
    model = make_model(nodes, [value("x", TensorProto.FLOAT16, [1, 2, 4, 4])],
                       [value("y", TensorProto.FLOAT16, [1, 2, 4, 4])], inits)
    assert_declines(model, FORWARD, "overflow float16")


def gelu_tail(n: Net, x: str, out: str) -> str:
    """GELU as torch exports it: the final Mul(0.5) is what onnxsim folds into the next layer."""
    d = n.op("Div", [x, n.const(f"{out}.sqrt2", np.float32(math.sqrt(2)))], f"{out}.div")
    e = n.op("Erf", [d], f"{out}.erf")
    a = n.op("Add", [e, n.const(f"{out}.one", np.float32(1))], f"{out}.add")
    m = n.op("Mul", [x, a], f"{out}.mul")
    return n.op("Mul", [m, n.const(f"{out}.half", np.float32(0.5))], out)


def test_declines_gelus_final_half_for_the_runtimes_gelu_fusion():
    n = Net([1, CHANNELS, 8, 8])
    g = gelu_tail(n, n.x, "g")
    model = n.model(n.conv(g, "y", CHANNELS, 4, kernel=1))
    assert_declines(model, FORWARD, "keeps onnxruntime's Gelu fusion")
    assert op_types(fold_only(model, None)[0]).count("Mul") == 2


def test_declines_a_bias_add_that_the_runtime_fuses_with_its_matmul():
    n = Net([3, 5])
    h = n.op("MatMul", [n.x, n.input("w1", [5, 5])], "h")
    t = n.op("Add", [h, n.random("b", [5])], "t")
    model = n.model(n.op("MatMul", [t, n.random("w2", [5, 4])], "y"))
    assert_declines(model, FORWARD, "keeps onnxruntime's MatMul+Add fusion")


def test_declines_a_map_a_subgraph_reads():
    shape = [1, CHANNELS, 4, 4]
    branches = {f"{kind}_branch": helper.make_graph(
        [helper.make_node(op, ["s"], [kind])], kind, [], [helper.make_tensor_value_info(kind, TensorProto.FLOAT, shape)])
        for kind, op in (("then", "Neg"), ("else", "Relu"))}
    nodes = [helper.make_node("Mul", ["x", "k"], ["s"], name="s"), helper.make_node("Conv", ["s", "w"], ["y"], name="y"),
             helper.make_node("If", ["cond"], ["z"], name="if", **branches)]
    inits = [numpy_helper.from_array(np.float32(2.0), "k"),
             numpy_helper.from_array(np.ones((4, CHANNELS, 1, 1), np.float32), "w")]
    value = helper.make_tensor_value_info
    model = make_model(nodes, [value("x", TensorProto.FLOAT, shape), value("cond", TensorProto.BOOL, [])],
                       [value("y", TensorProto.FLOAT, [1, 4, 4, 4]), value("z", TensorProto.FLOAT, shape)], inits)
    assert_declines(model, FORWARD, "'s' is also read by")  # the branch's node reads it
