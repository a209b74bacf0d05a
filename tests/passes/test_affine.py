"""fold-batchnorm and fold-affine on 1-5 node graphs: the fold is exact, and each decline says why."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.util import assert_same_outputs, fold_only, make_model, op_types

RNG_SEED = 7
FLOAT = TensorProto.FLOAT


def value_info(name: str, shape: Sequence[int | str], elem_type: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


class Builder:
    """Collects nodes, initializers and graph inputs for one small test model."""

    def __init__(self, seed: int = RNG_SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def random(self, name: str, shape: Sequence[int], low: float | None = None) -> str:
        value = self.rng.standard_normal(shape) if low is None else self.rng.uniform(low, low + 1.5, shape)
        return self.const(name, value.astype(np.float32))

    def input(self, name: str, shape: Sequence[int | str], elem_type: int = FLOAT) -> str:
        self.inputs.append(value_info(name, shape, elem_type))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None, **attrs) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name or outputs[0], **attrs))

    def bn_params(self, channels: int, prefix: str = "bn") -> list[str]:
        return [self.random(f"{prefix}.gamma", [channels], low=0.25), self.random(f"{prefix}.beta", [channels]),
                self.random(f"{prefix}.mean", [channels]), self.random(f"{prefix}.var", [channels], low=0.25)]

    def batchnorm(self, x: str, y: str, channels: int, prefix: str = "bn", **attrs) -> None:
        self.node("BatchNormalization", [x, *self.bn_params(channels, prefix)], [y], name=prefix, **attrs)

    def model(self, outputs: Sequence[onnx.ValueInfoProto], opset: int = 17) -> onnx.ModelProto:
        return make_model(self.nodes, self.inputs, outputs, self.inits, opset=opset)


def conv_graph(b: Builder, cin: int = 4, cout: int = 6, kernel: int = 3, group: int = 1,
               bias: bool = True, rank: int = 2, out: str = "y") -> None:
    """x [1, cin, 8(, 8)] -> Conv -> out; the Conv is named "conv"."""
    spatial = [8] * rank
    b.input("x", [1, cin, *spatial])
    inputs = ["x", b.random("w", [cout, cin // group, *[kernel] * rank])]
    if bias:
        inputs.append(b.random("b", [cout]))
    b.node("Conv", inputs, [out], name="conv", pads=[kernel // 2] * (2 * rank), group=group)


def assert_folded(model: onnx.ModelProto, passes: Sequence[str], count: int, ops_after: Sequence[str],
                  shapes=None) -> onnx.ModelProto:
    """The pass fires ``count`` times, leaves ``ops_after``, matches onnxruntime and is idempotent."""
    folded, report = fold_only(model, passes, input_shapes=shapes)
    assert [r.pass_name for r in report.rewrites] == [passes[0]] * count, [r.detail for r in report.rewrites]
    assert all(r.exact and r.error_bound is None for r in report.rewrites)
    assert report.declines == [], report.declines
    assert op_types(folded) == list(ops_after)
    assert_same_outputs(model, folded, shapes=shapes)
    _, again = fold_only(folded, passes, input_shapes=shapes)
    assert again.rewrites == []
    return folded


def assert_declined(model: onnx.ModelProto, passes: Sequence[str], reason: str) -> None:
    """No rewrite, and ``reason`` among the declines."""
    folded, report = fold_only(model, passes)
    assert report.rewrites == [], [r.detail for r in report.rewrites]
    found = [d.reason for d in report.declines]
    assert any(reason in text for text in found), found
    assert op_types(folded) == op_types(model)


BN = ["fold-batchnorm"]
AFFINE = ["fold-affine"]


# --- fold-batchnorm: positive cases -----------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_batchnorm_into_conv(bias, epsilon):
    b = Builder()
    conv_graph(b, bias=bias, out="c")
    b.batchnorm("c", "y", 6, epsilon=epsilon)
    model = b.model([value_info("y", [1, 6, 8, 8])])
    folded = assert_folded(model, BN, 1, ["Conv"])
    # The folded Conv writes the BN's output tensor, so the graph output keeps its name.
    assert [o.name for o in folded.graph.output] == ["y"]


@pytest.mark.parametrize("group", [2, 4], ids=["grouped", "depthwise"])
def test_batchnorm_into_grouped_conv(group):
    b = Builder()
    conv_graph(b, cin=4, cout=4 if group == 4 else 6, group=group, out="c")
    channels = 4 if group == 4 else 6
    b.batchnorm("c", "y", channels)
    assert_folded(b.model([value_info("y", [1, channels, 8, 8])]), BN, 1, ["Conv"])


def test_batchnorm_into_conv1d():
    b = Builder()
    conv_graph(b, rank=1, out="c")
    b.batchnorm("c", "y", 6)
    assert_folded(b.model([value_info("y", [1, 6, 8])]), BN, 1, ["Conv"])


@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_into_conv_transpose(group):
    b = Builder()
    b.input("x", [1, 4, 5, 5])
    b.node("ConvTranspose", ["x", b.random("w", [4, 3, 3, 3]), b.random("b", [3 * group])], ["c"],
           strides=[2, 2], group=group)
    b.batchnorm("c", "y", 3 * group)
    assert_folded(b.model([value_info("y", [1, 3 * group, 11, 11])]), BN, 1, ["ConvTranspose"])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_into_gemm(trans_b):
    b = Builder()
    b.input("x", [3, 5])
    weight = [4, 5] if trans_b else [5, 4]
    b.node("Gemm", ["x", b.random("w", weight), b.random("b", [4])], ["g"], transB=trans_b, alpha=0.5, beta=2.0)
    b.batchnorm("g", "y", 4)
    assert_folded(b.model([value_info("y", [3, 4])]), BN, 1, ["Gemm"])


def test_batchnorm_into_gemm_with_transposed_input_and_row_bias():
    b = Builder()
    b.input("x", [5, 3])
    b.node("Gemm", ["x", b.random("w", [5, 4]), b.random("b", [1, 4])], ["g"], transA=1)
    b.batchnorm("g", "y", 4)
    assert_folded(b.model([value_info("y", [3, 4])]), BN, 1, ["Gemm"])


def test_batchnorm_into_conv_whose_weight_is_a_constant_node():
    b = Builder()
    b.input("x", [1, 4, 8, 8])
    b.nodes.append(helper.make_node("Constant", [], ["w"], name="w", value=numpy_helper.from_array(
        b.rng.standard_normal([6, 4, 3, 3]).astype(np.float32))))
    b.node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    b.batchnorm("c", "y", 6)
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), BN, 1, ["Conv"])


def test_batchnorm_into_matmul_makes_a_gemm():
    b = Builder()
    b.input("x", [3, 5])
    b.node("MatMul", ["x", b.random("w", [5, 4])], ["m"])
    b.batchnorm("m", "y", 4)
    assert_folded(b.model([value_info("y", [3, 4])]), BN, 1, ["Gemm"])


def test_batchnorm_parameters_shared_by_two_batchnorms():
    # Folding the first must leave the shared initializers intact for the second.
    b = Builder()
    b.input("x", [1, 4, 8, 8])
    params = b.bn_params(6)
    for index in (1, 2):
        b.node("Conv", ["x", b.random(f"w{index}", [6, 4, 3, 3])], [f"c{index}"], name=f"conv{index}", pads=[1] * 4)
        b.node("BatchNormalization", [f"c{index}", *params], [f"n{index}"], name=f"bn{index}")
    b.node("Add", ["n1", "n2"], ["y"])
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), BN, 2, ["Conv", "Conv", "Add"])


def test_two_batchnorms_fold_one_after_the_other():
    b = Builder()
    conv_graph(b, out="c")
    b.batchnorm("c", "n", 6, prefix="bn1")
    b.batchnorm("n", "y", 6, prefix="bn2")
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), BN, 2, ["Conv"])


def test_batchnorm_with_a_dynamic_batch():
    b = Builder()
    b.input("x", ["N", 4, "H", "W"])
    b.node("Conv", ["x", b.random("w", [6, 4, 3, 3])], ["c"], name="conv", pads=[1, 1, 1, 1])
    b.batchnorm("c", "y", 6)
    model = b.model([value_info("y", ["N", 6, "H", "W"])])
    assert_folded(model, BN, 1, ["Conv"], shapes={"x": [2, 4, 7, 9]})


# --- fold-batchnorm: one test per decline reason ----------------------------------------------

def test_batchnorm_declines_training_outputs_in_use():
    b = Builder()
    conv_graph(b, out="c")
    b.node("BatchNormalization", ["c", *b.bn_params(6)], ["y", "running_mean", "running_var"],
           name="bn", training_mode=1)
    model = b.model([value_info("y", [1, 6, 8, 8]), value_info("running_mean", [6]),
                     value_info("running_var", [6])])
    assert_declined(model, BN, "BatchNormalization in training mode (running statistics are used)")


def test_batchnorm_declines_training_mode():
    # Training mode with its running statistics computed but never read.
    b = Builder()
    conv_graph(b, out="c")
    b.node("BatchNormalization", ["c", *b.bn_params(6)], ["y", "running_mean", "running_var"],
           name="bn", training_mode=1)
    model = b.model([value_info("y", [1, 6, 8, 8])])
    assert_declined(model, BN, "BatchNormalization is not in per-channel inference mode")


def test_batchnorm_declines_spatial_zero():
    # opset 7-8 BatchNormalization could normalize per activation instead of per channel.
    b = Builder()
    b.input("x", [1, 4, 8, 8])
    b.node("Conv", ["x", b.random("w", [6, 4, 1, 1])], ["c"], name="conv")
    b.node("BatchNormalization", ["c", *b.bn_params(6)], ["y"], name="bn", spatial=0)
    model = b.model([value_info("y", [1, 6, 8, 8])], opset=8)
    assert_declined(model, BN, "BatchNormalization is not in per-channel inference mode")


def test_batchnorm_declines_parameters_fed_at_run_time():
    b = Builder()
    conv_graph(b, out="c")
    gamma, beta, _, var = b.bn_params(6)
    b.node("BatchNormalization", ["c", gamma, beta, b.input("mean", [6]), var], ["y"], name="bn")
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), BN,
                    "BatchNormalization parameters are not float constants")


def test_batchnorm_declines_a_non_layer_producer():
    b = Builder()
    b.input("x", [1, 6, 8, 8])
    b.node("Relu", ["x"], ["r"])
    b.batchnorm("r", "y", 6)
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), BN,
                    "input is not produced by Conv, ConvTranspose, Gemm or MatMul")


def test_batchnorm_declines_a_channel_axis_that_is_not_the_layers():
    # [B, T, K] @ [K, N] -> BN normalizes axis 1 (T), but the weight's channels are on the last axis.
    b = Builder()
    b.input("x", [2, 3, 5])
    b.node("MatMul", ["x", b.random("w", [5, 4])], ["m"])
    b.batchnorm("m", "y", 3)
    assert_declined(b.model([value_info("y", [2, 3, 4])]), BN,
                    "BatchNormalization's channel axis is not the layer's output channel axis")


def test_batchnorm_declines_parameters_of_another_length():
    # Only a broken model has this: build it without the checker and never run it.
    b = Builder()
    conv_graph(b, out="c")
    b.batchnorm("c", "y", 5)
    graph = helper.make_graph(b.nodes, "test", b.inputs, [value_info("y", [1, 6, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = fold_only(model, BN)
    assert report.rewrites == []
    assert [d.reason for d in report.declines] == \
        ["BatchNormalization parameters do not match the layer's channel count"]


# --- the layer's own reasons, for both passes -------------------------------------------------

def add_tail(b: Builder, tail: str, x: str, y: str, channels: int, rank: int = 4) -> None:
    """BN, or a Mul by a per-channel constant, after ``x``."""
    if tail == "bn":
        b.batchnorm(x, y, channels)
    else:
        shape = [channels] + [1] * (rank - 2) if rank > 2 else [channels]
        b.node("Mul", [x, b.random("scale", shape)], [y], name="mul")


TAILS = ["bn", "mul"]
PASS_OF = {"bn": BN, "mul": AFFINE}


@pytest.mark.parametrize("tail", TAILS)
def test_declines_an_intermediate_that_is_a_graph_output(tail):
    b = Builder()
    conv_graph(b, out="c")
    add_tail(b, tail, "c", "y", 6)
    model = b.model([value_info("y", [1, 6, 8, 8]), value_info("c", [1, 6, 8, 8])])
    assert_declined(model, PASS_OF[tail], "intermediate 'c' is a graph output")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_an_intermediate_with_two_readers(tail):
    b = Builder()
    conv_graph(b, out="c")
    add_tail(b, tail, "c", "t", 6)
    b.node("Relu", ["c"], ["r"])
    b.node("Add", ["t", "r"], ["y"])
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), PASS_OF[tail],
                    "intermediate 'c' is used by 2 nodes")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_a_weight_fed_at_run_time(tail):
    b = Builder()
    b.input("x", [1, 4, 8, 8])
    b.node("Conv", ["x", b.input("w", [6, 4, 3, 3])], ["c"], name="conv", pads=[1, 1, 1, 1])
    add_tail(b, tail, "c", "y", 6)
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), PASS_OF[tail], "Conv weight is not a float constant")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_a_shared_weight(tail):
    b = Builder()
    conv_graph(b, out="c")
    add_tail(b, tail, "c", "y", 6)
    b.node("Conv", ["x", "w"], ["z"], name="other", pads=[1, 1, 1, 1])
    model = b.model([value_info("y", [1, 6, 8, 8]), value_info("z", [1, 6, 8, 8])])
    assert_declined(model, PASS_OF[tail], "Conv weight is shared with another node")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_a_bias_fed_at_run_time(tail):
    b = Builder()
    b.input("x", [1, 4, 8, 8])
    b.node("Conv", ["x", b.random("w", [6, 4, 3, 3]), b.input("bias", [6])], ["c"], name="conv", pads=[1, 1, 1, 1])
    add_tail(b, tail, "c", "y", 6)
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), PASS_OF[tail], "Conv bias is not a float constant")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_a_matmul_weight_that_is_not_a_matrix(tail):
    b = Builder()
    b.input("x", [2, 4, 5])
    b.node("MatMul", ["x", b.random("w", [2, 5, 4])], ["m"])
    add_tail(b, tail, "m", "y", 4, rank=1)  # BN sees 4 channels on axis 1, Mul a [4] vector
    assert_declined(b.model([value_info("y", [2, 4, 4])]), PASS_OF[tail], "MatMul weight is not a 2-D matrix")


@pytest.mark.parametrize("tail", TAILS)
def test_declines_a_gemm_bias_that_is_not_a_vector(tail):
    b = Builder()
    b.input("x", [3, 5])
    b.node("Gemm", ["x", b.random("w", [5, 4]), b.random("bias", [3, 4])], ["g"])
    add_tail(b, tail, "g", "y", 4, rank=2)
    assert_declined(b.model([value_info("y", [3, 4])]), PASS_OF[tail], "Gemm bias is not a constant vector")


# --- fold-affine: positive cases --------------------------------------------------------------

@pytest.mark.parametrize("op,const_first", [("Mul", False), ("Mul", True), ("Add", False), ("Add", True),
                                            ("Sub", False), ("Sub", True), ("Div", False)])
@pytest.mark.parametrize("shape", [[1, 6, 1, 1], [6, 1, 1], [1]], ids=["nc11", "c11", "scalar"])
def test_affine_into_conv(op, const_first, shape):
    b = Builder()
    conv_graph(b, out="c")
    value = b.random("k", shape, low=0.5)  # positive, so Div is well defined
    b.node(op, [value, "c"] if const_first else ["c", value], ["y"], name="affine")
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), AFFINE, 1, ["Conv"])


def test_affine_constant_from_a_constant_node():
    b = Builder()
    conv_graph(b, out="c")
    b.nodes.append(helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(
        np.linspace(0.5, 2.0, 6, dtype=np.float32).reshape(6, 1, 1))))
    b.node("Mul", ["c", "k"], ["y"])
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), AFFINE, 1, ["Conv"])


def test_affine_chain_folds_every_step():
    b = Builder()
    conv_graph(b, bias=False, out="c")
    b.node("Mul", ["c", b.random("s", [6, 1, 1])], ["m"])
    b.node("Add", ["m", b.random("t", [6, 1, 1])], ["y"])
    assert_folded(b.model([value_info("y", [1, 6, 8, 8])]), AFFINE, 2, ["Conv"])


def test_affine_into_conv_transpose():
    b = Builder()
    b.input("x", [1, 4, 5, 5])
    b.node("ConvTranspose", ["x", b.random("w", [4, 3, 3, 3])], ["c"], group=2)
    b.node("Add", ["c", b.random("t", [6, 1, 1])], ["y"])
    assert_folded(b.model([value_info("y", [1, 6, 7, 7])]), AFFINE, 1, ["ConvTranspose"])


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_affine_into_gemm(op):
    b = Builder()
    b.input("x", [3, 5])
    b.node("Gemm", ["x", b.random("w", [4, 5])], ["g"], transB=1)
    b.node(op, ["g", b.random("k", [4])], ["y"])
    assert_folded(b.model([value_info("y", [3, 4])]), AFFINE, 1, ["Gemm"])


@pytest.mark.parametrize("op,after", [("Mul", "MatMul"), ("Add", "Gemm")])
def test_affine_into_matmul(op, after):
    # A shift needs a bias, which a rank-2 MatMul gets by becoming a Gemm.
    b = Builder()
    b.input("x", [3, 5])
    b.node("MatMul", ["x", b.random("w", [5, 4])], ["m"])
    b.node(op, ["m", b.random("k", [4])], ["y"])
    assert_folded(b.model([value_info("y", [3, 4])]), AFFINE, 1, [after])


def test_scale_into_a_rank3_matmul():
    b = Builder()
    b.input("x", [2, 3, 5])
    b.node("MatMul", ["x", b.random("w", [5, 4])], ["m"])
    b.node("Mul", ["m", b.random("k", [4])], ["y"])
    assert_folded(b.model([value_info("y", [2, 3, 4])]), AFFINE, 1, ["MatMul"])


# --- fold-affine: one test per decline reason -------------------------------------------------

NOT_PER_CHANNEL = "is not a finite per-output-channel vector of the layer's dtype"


@pytest.mark.parametrize("value,width,batch", [
    (np.ones([1, 6, 8, 8], np.float32), 8, 1),   # varies (or may vary) spatially
    (np.ones([6], np.float32), 6, 1),            # [C] lines up with W, not with C
    (np.ones([2, 6, 1, 1], np.float32), 8, 2),   # would grow the output
    (np.array([1, 2, np.inf, 1, 1, 1], np.float32).reshape(6, 1, 1), 8, 1),  # not finite
], ids=["spatial", "last-axis", "grows", "inf"])
def test_affine_declines_a_constant_that_is_not_per_channel(value, width, batch):
    b = Builder()
    b.input("x", [1, 4, 8, width])
    b.node("Conv", ["x", b.random("w", [6, 4, 3, 3])], ["c"], name="conv", pads=[1, 1, 1, 1])
    b.node("Mul", ["c", b.const("k", value)], ["y"])
    assert_declined(b.model([value_info("y", [batch, 6, 8, width])]), AFFINE,
                    f"Mul constant of shape {list(value.shape)} {NOT_PER_CHANNEL}")


def test_affine_declines_division_by_zero():
    b = Builder()
    conv_graph(b, out="c")
    b.node("Div", ["c", b.const("k", np.array([1, 2, 0, 1, 1, 1], np.float32).reshape(6, 1, 1))], ["y"])
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), AFFINE, f"Div constant of shape [6, 1, 1] {NOT_PER_CHANNEL}")


def test_affine_declines_a_constant_divided_by_the_layer():
    b = Builder()
    conv_graph(b, out="c")
    b.node("Div", [b.random("k", [6, 1, 1], low=0.5), "c"], ["y"])
    assert_declined(b.model([value_info("y", [1, 6, 8, 8])]), AFFINE,
                    "constant divided by the layer output is not affine")


def test_affine_declines_a_shift_after_a_rank3_matmul():
    b = Builder()
    b.input("x", [2, 3, 5])
    b.node("MatMul", ["x", b.random("w", [5, 4])], ["m"])
    b.node("Add", ["m", b.random("k", [4])], ["y"])
    assert_declined(b.model([value_info("y", [2, 3, 4])]), AFFINE,
                    "a shift after a MatMul of rank > 2 has no bias to go into")


# --- both passes, on what an exporter writes --------------------------------------------------

def test_default_pipeline_folds_conv_bn_relu_and_scale():
    b = Builder()
    conv_graph(b, out="c")
    b.batchnorm("c", "n", 6)
    b.node("Relu", ["n"], ["r"])
    b.node("Conv", ["r", b.random("w2", [6, 6, 1, 1])], ["c2"], name="conv2")
    b.node("Mul", ["c2", b.random("s", [1, 6, 1, 1])], ["y"])
    model = b.model([value_info("y", [1, 6, 8, 8])])
    folded, report = fold_only(model, ["fold-batchnorm", "fold-affine"])
    assert report.counts() == {"fold-batchnorm": 1, "fold-affine": 1}
    assert op_types(folded) == ["Conv", "Relu", "Conv"]
    assert_same_outputs(model, folded)
