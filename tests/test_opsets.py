"""Models as they come: opsets 7 to 21 with their attribute or input forms, IR versions,
initializers that are graph inputs, several outputs, shared weights, float16/float64/bfloat16
weights, custom domains, quantized nodes, If/Loop/Scan subgraphs and dynamic dims.

graphfold optimizes what it can, leaves the rest untouched, and never breaks a model: every
result passes ``onnx.checker`` and matches the original under onnxruntime (or under onnx's
reference evaluator where onnxruntime has no kernel).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfold
from graphfold import kernels
from tests.util import FLOAT, Net, assert_same_outputs, fold_only, make_model, op_types, run_ort

OPSETS = list(range(7, 22))


def int64(n: Net, name: str, values) -> str:
    return n.const(name, np.asarray(values, np.int64))


def scalar(n: Net, name: str, value: float) -> str:
    return n.const(name, np.asarray(value, np.float32))


def clip(n: Net, x: str, out: str, low: float | None, high: float | None, opset: int) -> str:
    if opset < 11:
        attrs = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        return n.op("Clip", [x], out, **attrs)
    inputs = [x, "" if low is None else scalar(n, f"{out}.min", low)]
    if high is not None:
        inputs.append(scalar(n, f"{out}.max", high))
    return n.op("Clip", inputs, out)


def pad(n: Net, x: str, out: str, pads: list[int], opset: int) -> str:
    if opset < 11:
        return n.op("Pad", [x], out, pads=pads, mode="constant", value=0.0)
    return n.op("Pad", [x, int64(n, f"{out}.pads", pads), scalar(n, f"{out}.value", 0.0)], out, mode="constant")


def split(n: Net, x: str, outs: list[str], sizes: list[int], opset: int) -> list[str]:
    if opset < 13:
        n.nodes.append(helper.make_node("Split", [x], outs, name=outs[0], axis=1, split=sizes))
    else:
        n.nodes.append(helper.make_node("Split", [x, int64(n, f"{outs[0]}.split", sizes)], outs, name=outs[0], axis=1))
    return outs


def with_axes(n: Net, op: str, x: str, out: str, axes: list[int], opset: int, **attrs) -> str:
    """Squeeze, Unsqueeze, ReduceSum: axes became an input at opset 13."""
    if opset < 13:
        return n.op(op, [x], out, axes=axes, **attrs)
    return n.op(op, [x, int64(n, f"{out}.axes", axes)], out, **attrs)


def dropout(n: Net, x: str, out: str, opset: int) -> str:
    if opset < 12:
        return n.op("Dropout", [x], out, ratio=0.3)
    return n.op("Dropout", [x, scalar(n, f"{out}.ratio", 0.3)], out)


def opset_model(opset: int) -> onnx.ModelProto:
    """Conv-BN-Relu-Clip(0, 6)-Relu-Pad-Conv-Mul, split in two: ReduceSum on one half,
    Unsqueeze-Squeeze-Dropout on the other; each op in the form its opset defines."""
    n = Net([1, 3, 8, 8], seed=opset)
    c = n.conv(n.x, "conv1", 3, 4, pads=[1, 1, 1, 1])
    b = n.batchnorm(c, "bn", 4, **({"spatial": 1} if opset < 9 else {}))
    r = n.op("Relu", [b], "relu")
    r2 = n.op("Relu", [clip(n, r, "clip", 0.0, 6.0, opset)], "relu2")  # an identity: input in [0, 6]
    c2 = n.conv(pad(n, r2, "pad", [0, 0, 1, 1, 0, 0, 1, 1], opset), "conv2", 4, 4, kernel=1)
    m = n.op("Mul", [c2, n.const("scale", n.rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32))], "mul")
    s0, s1 = split(n, m, ["s0", "s1"], [2, 2], opset)
    total = with_axes(n, "ReduceSum", s0, "sum", [2, 3], opset, keepdims=1)
    squeezed = with_axes(n, "Squeeze", with_axes(n, "Unsqueeze", s1, "unsq", [0], opset), "sq", [0], opset)
    return n.model(total, dropout(n, squeezed, "drop", opset), opset=opset)


def assert_valid(folded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    onnx.checker.check_model(folded, full_check=True)
    assert folded.ir_version == original.ir_version
    assert list(folded.opset_import) == list(original.opset_import)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    assert len(folded.graph.node) <= len(original.graph.node)


# --- opsets 7 to 21 ---------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
def test_every_opset_folds_in_its_own_forms(opset):
    model = opset_model(opset)
    folded, report = graphfold.fold(model)
    assert report.validation.passed
    assert_valid(folded, model)
    counts = report.counts()
    assert counts["fold-batchnorm"] == 1 and counts["fold-affine"] == 1
    assert counts["remove-identity-activations"] == 1  # the Relu after Clip(0, 6)
    assert counts["remove-identity"] == 1  # inference Dropout
    assert op_types(folded).count("Relu") == 1
    assert not {"BatchNormalization", "Dropout", "Mul"} & set(op_types(folded))
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("low, high, removable", [(0.0, None, True), (None, 6.0, False), (-1.0, 6.0, False)])
def test_clip_bounds_in_either_form(opset, low, high, removable):
    """A Relu after Clip is an identity only when the Clip's lower bound is >= 0, whether the
    bounds are attributes (opset < 11) or inputs, and whether one is omitted."""
    n = Net([1, 4, 5, 5])
    r = n.op("Relu", [clip(n, n.x, "clip", low, high, opset)], "relu")
    model = n.model(r, opset=opset)
    folded, report = graphfold.fold(model)
    assert ("Relu" not in op_types(folded)) == removable
    assert_valid(folded, model)
    assert_same_outputs(model, folded)


# --- IR versions, initializers as inputs ------------------------------------------------------

IR_OPSETS = {3: 8, 4: 9, 5: 10, 6: 11, 7: 12, 8: 14, 9: 19, 10: 21}


def conv_bn(shape=(1, 3, 8, 8), seed: int = 0) -> Net:
    n = Net(list(shape), seed=seed)
    n.batchnorm(n.conv(n.x, "conv", shape[1], 4, pads=[1, 1, 1, 1]), "y", 4)
    return n


@pytest.mark.parametrize("ir_version", sorted(IR_OPSETS))
def test_ir_versions(ir_version):
    n = conv_bn()
    model = n.model("y", opset=IR_OPSETS[ir_version])
    model.ir_version = ir_version
    if ir_version < 4:  # IR 3 lists every initializer as a graph input too
        model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                                 for i in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    folded, report = graphfold.fold(model)
    assert report.counts()["fold-batchnorm"] == 1
    assert_valid(folded, model)
    if ir_version < 4:
        assert {i.name for i in folded.graph.initializer} <= {i.name for i in folded.graph.input}
    assert_same_outputs(model, folded)


def test_initializers_that_are_graph_inputs_are_left_overridable():
    """From IR 4 on, an initializer listed as a graph input is a default a caller may replace at
    run time; folding it would bake the default in. It stays an input; the rest folds."""
    n = conv_bn()
    n.conv("y", "z", 4, 4, kernel=1)
    model = n.model("z", opset=13)
    model.graph.input.append(helper.make_tensor_value_info("conv.w", FLOAT, [4, 3, 3, 3]))
    onnx.checker.check_model(model, full_check=True)
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert [i.name for i in folded.graph.input] == ["x", "conv.w"]
    assert "conv.w" in {i.name for i in folded.graph.initializer}
    assert any("fold-batchnorm" == d.pass_name for d in report.declines)
    assert any("graph inputs" in note and "conv.w" in note for note in report.notes)
    assert "graph inputs" in report.summary()
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
             "conv.w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_freeze_initializer_inputs_folds_them_and_drops_them_from_the_inputs():
    n = conv_bn()
    n.conv("y", "z", 4, 4, kernel=1)
    model = n.model("z", opset=13)
    model.graph.input.append(helper.make_tensor_value_info("conv.w", FLOAT, [4, 3, 3, 3]))
    folded, report = graphfold.fold(model, freeze_initializer_inputs=True)
    assert report.counts()["fold-batchnorm"] == 1
    assert [i.name for i in folded.graph.input] == ["x"]
    assert not any("graph inputs" in note for note in report.notes)
    assert_same_outputs(model, folded)  # the original runs with the initializer's default value


# --- outputs and shared weights ---------------------------------------------------------------

def test_several_outputs_one_of_them_an_intermediate():
    n = conv_bn()
    n.op("Relu", ["y"], "z")
    n.batchnorm(n.conv(n.x, "other", 3, 2, kernel=1), "w", 2)
    model = n.model("conv", "z", "w")  # conv's output is an output: its BN must stay
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert report.counts()["fold-batchnorm"] == 1  # only the BN after "other"
    assert any("graph output" in d.reason for d in report.declines)
    assert_same_outputs(model, folded)


def test_shared_weight_is_not_rewritten():
    n = Net([1, 3, 8, 8])
    w = n.random("shared.w", [4, 3, 3, 3], 27)
    n.batchnorm(n.conv(n.x, "a", 3, 4, weight=w, bias=False), "ya", 4)
    n.batchnorm(n.conv(n.x, "b", 3, 4, weight=w, bias=False), "yb", 4)
    model = n.model("ya", "yb")
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert "fold-batchnorm" not in report.counts()
    assert all("shared" in d.reason for d in report.declines if d.pass_name == "fold-batchnorm")
    original = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == w))
    kept = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == w))
    np.testing.assert_array_equal(kept, original)
    assert_same_outputs(model, folded)


# --- float16, float64, bfloat16 ---------------------------------------------------------------

def typed_conv_bn(dtype: int, opset: int = 17, ops=("Conv", "BatchNormalization")) -> onnx.ModelProto:
    npdt = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(0)
    values = {"w": rng.standard_normal((4, 3, 3, 3)) / 5, "b": rng.standard_normal(4),
              "g": rng.uniform(0.5, 1.5, 4), "be": rng.standard_normal(4), "mu": rng.standard_normal(4),
              "va": rng.uniform(0.5, 1.5, 4)}
    inits = [helper.make_tensor(k, dtype, v.shape, v.astype(np.float32).ravel().tolist())
             if dtype == TensorProto.BFLOAT16 else numpy_helper.from_array(v.astype(npdt), k)
             for k, v in values.items()]
    nodes = [helper.make_node(ops[0], ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(ops[1], ["c", "g", "be", "mu", "va"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", dtype, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", dtype, [1, 4, 8, 8])], inits, opset=opset)


def initializer(model: onnx.ModelProto, op: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph.node if n.op_type == op)
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[index]))


def test_float16_weights_fold_in_float64_and_cast_back():
    model = typed_conv_bn(TensorProto.FLOAT16)
    folded, report = graphfold.fold(model)  # validated at the float16 tolerance
    assert report.counts()["fold-batchnorm"] == 1
    assert_valid(folded, model)
    weight = initializer(folded, "Conv", 1)
    assert weight.dtype == np.float16
    # Exactly the float64 fold, rounded once.
    params = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    scale, shift = kernels.bn_scale_shift(params["g"], params["be"], params["mu"], params["va"], 1e-5)
    np.testing.assert_array_equal(weight, (params["w"] * scale[:, None, None, None]).astype(np.float16))
    np.testing.assert_array_equal(initializer(folded, "Conv", 2), (params["b"] * scale + shift).astype(np.float16))


def test_float16_fold_that_would_overflow_is_declined():
    model = typed_conv_bn(TensorProto.FLOAT16)
    gamma = next(i for i in model.graph.initializer if i.name == "g")
    gamma.CopyFrom(numpy_helper.from_array(np.full(4, 60000.0, np.float16), "g"))
    folded, report = graphfold.fold(model)
    assert report.rewrites == []
    assert any("overflow float16" in d.reason for d in report.declines)
    assert_valid(folded, model)


def scaled_float16_model(second: str) -> onnx.ModelProto:
    """x * 1e-4 into two float16 convs whose merged weights exceed float16's range (65504) although
    each conv's output stays small: ``second`` is "chain" (1x1 then 1x1, weights 300: merged 4 * 300^2)
    or "branches" (3x3 + 1x1 over the same input, centre weights 40000: merged 80000)."""
    h = np.float16
    if second == "chain":
        weights = [np.full((4, 4, 1, 1), 300, h), np.full((4, 4, 1, 1), 300, h)]
        nodes = [helper.make_node("Conv", ["xs", "w1"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    else:
        weights = [np.zeros((4, 4, 3, 3), h), np.full((4, 4, 1, 1), 40000, h)]
        weights[0][:, :, 1, 1] = 40000
        nodes = [helper.make_node("Conv", ["xs", "w1"], ["a"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["xs", "w2"], ["b"]), helper.make_node("Add", ["a", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1e-4, h), "s")] + \
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights, 1)]
    value = helper.make_tensor_value_info
    return make_model([helper.make_node("Mul", ["x", "s"], ["xs"])] + nodes,
                      [value("x", TensorProto.FLOAT16, [1, 4, 8, 8])], [value("y", TensorProto.FLOAT16, [1, 4, 8, 8])],
                      inits)


@pytest.mark.parametrize("second", ["chain", "branches"])
def test_float16_merge_that_would_overflow_is_declined(second):
    import warnings

    model = scaled_float16_model(second)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = graphfold.fold(model, fold_all=True)
    assert [str(w.message) for w in caught] == []  # a RuntimeWarning would reach the user's stderr
    assert report.validation.passed
    assert_valid(folded, model)


def test_float64_weights_fold_exactly():
    """onnxruntime has no float64 Conv: the default run says so in one line; unvalidated, the
    fold matches onnx's reference evaluator to float64 rounding."""
    from onnx.reference import ReferenceEvaluator

    model = typed_conv_bn(TensorProto.DOUBLE)
    with pytest.raises(graphfold.UsageError, match="onnxruntime cannot run the original"):
        graphfold.fold(model)
    folded, report = fold_only(model, None)
    assert report.counts()["fold-batchnorm"] == 1
    assert_valid(folded, model)
    assert initializer(folded, "Conv", 1).dtype == np.float64
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8))
    ref, out = ReferenceEvaluator(model).run(None, {"x": x})[0], ReferenceEvaluator(folded).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_bfloat16_weights_are_left_alone():
    model = typed_conv_bn(TensorProto.BFLOAT16, opset=22)
    folded, report = fold_only(model, None)
    assert report.rewrites == []
    assert any(d.pass_name == "fold-batchnorm" for d in report.declines)
    assert_valid(folded, model)
    assert all(i.data_type == TensorProto.BFLOAT16 for i in folded.graph.initializer)
    assert [i.raw_data or i.int32_data for i in folded.graph.initializer] == \
        [i.raw_data or i.int32_data for i in model.graph.initializer]


def test_bfloat16_weights_behind_a_cast():
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("wb", TensorProto.BFLOAT16, [4, 3, 3, 3], (rng.standard_normal(108) / 5).tolist())
    nodes = [helper.make_node("Cast", ["wb"], ["w"], to=FLOAT), helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("y", FLOAT, [1, 4, 6, 6])], [weight])
    folded, report = graphfold.fold(model)
    assert report.validation.passed and report.validation.max_abs == 0
    assert op_types(folded) == ["Conv", "Relu"]
    assert_valid(folded, model)


def test_bfloat16_arithmetic_identities(capsys):
    inits = [helper.make_tensor("one", TensorProto.BFLOAT16, [], [1.0]),
             helper.make_tensor("c", TensorProto.BFLOAT16, [4, 1, 1], [1.5, 2.0, 0.25, -1.0])]
    nodes = [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Mul", ["a", "one"], ["y"])]
    value = helper.make_tensor_value_info
    model = make_model(nodes, [value("x", TensorProto.BFLOAT16, [1, 4, 8, 8])],
                       [value("y", TensorProto.BFLOAT16, [1, 4, 8, 8])], inits)
    folded, report = fold_only(model, None)
    assert op_types(folded) == ["Add"]
    assert_valid(folded, model)
    c = next(i for i in folded.graph.initializer if i.name == "c")
    assert c.data_type == TensorProto.BFLOAT16
    assert capsys.readouterr().out == ""  # graphsurgeon's bfloat16 warnings stay quiet


# --- custom domains and quantized graphs ------------------------------------------------------

def custom_model() -> onnx.ModelProto:
    n = conv_bn()
    k = n.const("k", np.ones(4, np.float32))
    n.nodes.append(helper.make_node("MyGen", [k], ["gen"], name="gen", domain="com.example"))
    n.nodes.append(helper.make_node("MyOp", ["y", "gen"], ["u"], name="myop", domain="com.example", alpha=2.0))
    n.batchnorm(n.conv("u", "z", 4, 4, kernel=1), "out", 4)
    graph = helper.make_graph(n.nodes, "custom", n.inputs, [helper.make_tensor_value_info("out", FLOAT, [1, 4, 8, 8])],
                              n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    return model


def test_custom_ops_pass_through_untouched():
    model = custom_model()
    with pytest.raises(graphfold.UsageError, match="onnxruntime cannot run the original model"):
        graphfold.fold(model)
    folded, report = fold_only(model, None)
    onnx.checker.check_model(folded)
    assert report.counts()["fold-batchnorm"] == 2  # on both sides of the custom op
    assert list(folded.opset_import) == list(model.opset_import)
    custom = {n.name: n for n in model.graph.node if n.domain == "com.example"}
    kept = {n.name: n for n in folded.graph.node if n.domain == "com.example"}
    assert kept == custom  # not evaluated, not rewired, attributes as they were


def test_quantized_graph_is_untouched():
    """QDQ weights stay int8 with their DequantizeLinear, so the BN after that conv stays too; a
    QLinearConv is left alone; the float part of the graph still folds."""
    n = Net([1, 3, 8, 8])
    rng = np.random.default_rng(0)
    wq = n.const("wq", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8))
    w = n.op("DequantizeLinear", [wq, scalar(n, "ws", 0.01), n.const("wz", np.array(0, np.int8))], "w")
    xs, xz = scalar(n, "xs", 0.05), n.const("xz", np.array(128, np.uint8))
    q = n.op("QuantizeLinear", [n.x, xs, xz], "q")
    n.batchnorm(n.op("Conv", [n.op("DequantizeLinear", [q, xs, xz], "dq"), w], "c"), "y", 4)
    ys, yz = scalar(n, "ys", 0.1), n.const("yz", np.array(128, np.uint8))
    qconv = n.op("QLinearConv", [q, xs, xz, wq, scalar(n, "ws2", 0.01), n.const("wz2", np.array(0, np.int8)), ys, yz],
                 "qconv")
    n.op("DequantizeLinear", [qconv, ys, yz], "z")
    n.batchnorm(n.conv(n.x, "f", 3, 4, kernel=1), "fy", 4)  # plain float
    model = n.model("y", "z", "fy", opset=13)
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert report.counts() == {"fold-batchnorm": 1}
    quantized = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv")]
    assert [n for n in folded.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv")] \
        == quantized
    assert initializer(folded, "QLinearConv", 3).dtype == np.int8
    assert_same_outputs(model, folded)


# --- subgraphs --------------------------------------------------------------------------------

def conv_branch(name: str, seed: int, source: str, out_shape: list[int], channels: int = 4) -> onnx.GraphProto:
    """A subgraph: Conv-BN-Relu reading ``source`` (``channels`` wide) from the outer graph."""
    n = Net([1], seed=seed)
    n.inputs.clear()
    n.op("Relu", [n.batchnorm(n.conv(source, f"{name}.conv", channels, 4, pads=[1, 1, 1, 1]), f"{name}.bn", 4)],
         f"{name}.out")
    return helper.make_graph(n.nodes, name, [], [helper.make_tensor_value_info(f"{name}.out", FLOAT, out_shape)],
                             n.inits)


def if_model(outer_kernel: int = 3) -> onnx.ModelProto:
    n = Net([1, 3, 8, 8])
    pads = [1, 1, 1, 1] if outer_kernel == 3 else [0, 0, 0, 0]
    n.batchnorm(n.conv(n.x, "conv", 3, 4, kernel=outer_kernel, pads=pads), "bn", 4)
    n.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    n.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if",
                                    then_branch=conv_branch("then", 1, "bn", [1, 4, 8, 8]),
                                    else_branch=conv_branch("else", 2, "conv", [1, 4, 8, 8])))
    graph = helper.make_graph(n.nodes, "if", n.inputs, [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])],
                              n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_same_for_both_branches(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


def subgraph_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [sub_node for node in model.graph.node for attr in node.attribute
            for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
            for sub_node in graph.node]


def test_if_branches_are_left_as_they_are():
    model = if_model()
    folded, report = graphfold.fold(model, fold_all=True)
    assert_valid(folded, model)
    # The outer BN feeds a branch but its conv's output is read by the other one: both kept.
    assert op_types(folded) == ["Conv", "BatchNormalization", "If"]
    assert subgraph_nodes(folded) == subgraph_nodes(model)
    assert_same_for_both_branches(model, folded)


def test_outer_conv_is_never_merged_with_a_conv_inside_a_branch():
    """A 1x1 conv whose only reader is a conv inside an If branch is no conv chain: merging them
    left the branch without the node producing its output."""
    n = Net([1, 3, 8, 8])
    n.conv(n.x, "conv", 3, 4, kernel=1)
    n.op("Relu", [n.x], "x0")
    n.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    n.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if",
                                    then_branch=conv_branch("then", 1, "conv", [1, 4, 8, 8]),
                                    else_branch=conv_branch("else", 2, "x0", [1, 4, 8, 8], channels=3)))
    graph = helper.make_graph(n.nodes, "if", n.inputs, [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])],
                              n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    folded, report = graphfold.fold(model, fold_all=True)
    assert_valid(folded, model)
    assert "merge-conv-chain" not in report.counts()
    assert subgraph_nodes(folded) == subgraph_nodes(model)
    assert_same_for_both_branches(model, folded)


def loop_model() -> onnx.ModelProto:
    """Conv-BN, then a Loop whose body adds a Conv of the outer activation to its state."""
    n = conv_bn()
    body = Net([1], seed=7)
    body.inputs.clear()
    body.inputs += [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                    helper.make_tensor_value_info("keep", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("state", FLOAT, [1, 4, 8, 8])]
    body.op("Identity", ["keep"], "keep_out")
    conv = body.batchnorm(body.conv("y", "body.conv", 4, 4, pads=[1, 1, 1, 1]), "body.bn", 4)
    body.op("Add", ["state", conv], "state_out")
    value = helper.make_tensor_value_info
    body_graph = helper.make_graph(body.nodes, "body", body.inputs,
                                   [value("keep_out", TensorProto.BOOL, []), value("state_out", FLOAT, [1, 4, 8, 8])],
                                   body.inits)
    n.inputs += [value("trips", TensorProto.INT64, []), value("go", TensorProto.BOOL, [])]
    n.nodes.append(helper.make_node("Loop", ["trips", "go", "y"], ["z"], name="loop", body=body_graph))
    graph = helper.make_graph(n.nodes, "loop", n.inputs, [value("z", FLOAT, [1, 4, 8, 8])], n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_loop_body_is_left_as_it_is():
    model = loop_model()
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert "BatchNormalization" not in op_types(folded)  # the outer one
    assert subgraph_nodes(folded) == subgraph_nodes(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for trips in (0, 1, 3):
        feeds = {"x": x, "trips": np.array(trips, np.int64), "go": np.array(True)}
        np.testing.assert_allclose(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_scan_body_is_left_as_it_is():
    """A Gemm-BN before a Scan that accumulates a constant-scaled running sum over rows."""
    n = Net([5, 6])
    n.op("Gemm", [n.x, n.random("g.w", [6, 4], 6), n.random("g.b", [4])], "g")
    n.batchnorm("g", "gb", 4)
    value = helper.make_tensor_value_info
    body = make_body_scan()
    n.nodes.append(helper.make_node("Scan", ["init", "gb"], ["final", "rows"], name="scan", body=body,
                                    num_scan_inputs=1))
    n.inputs.append(value("init", FLOAT, [4]))
    graph = helper.make_graph(n.nodes, "scan", n.inputs, [value("final", FLOAT, [4]), value("rows", FLOAT, [5, 4])],
                              n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    folded, report = graphfold.fold(model)
    assert_valid(folded, model)
    assert report.counts()["fold-batchnorm"] == 1
    assert subgraph_nodes(folded) == subgraph_nodes(model)
    assert_same_outputs(model, folded)


def make_body_scan() -> onnx.GraphProto:
    value = helper.make_tensor_value_info
    scale = numpy_helper.from_array(np.full(4, 0.5, np.float32), "half")
    nodes = [helper.make_node("Mul", ["row", "half"], ["scaled"]), helper.make_node("Add", ["acc", "scaled"], ["acc_out"]),
             helper.make_node("Identity", ["acc_out"], ["row_out"])]
    return helper.make_graph(nodes, "body", [value("acc", FLOAT, [4]), value("row", FLOAT, [4])],
                             [value("acc_out", FLOAT, [4]), value("row_out", FLOAT, [4])], [scale])


# --- dynamic dims -----------------------------------------------------------------------------

def test_dynamic_batch_and_spatial_dims():
    """Exact folds happen; the border-corrected 1x1 -> padded 3x3 merge needs static spatial dims
    and is declined; the result keeps its symbolic dims and validates at batch 1 and 2."""
    n = Net(["N", 3, "H", "W"])
    c1 = n.conv(n.x, "pw", 3, 4, kernel=1)
    n.batchnorm(n.conv(c1, "c3", 4, 4, pads=[1, 1, 1, 1]), "y", 4)
    model = n.model("y")
    folded, report = graphfold.fold(model, fold_all=True)
    assert_valid(folded, model)
    assert report.counts()["fold-batchnorm"] == 1
    assert "merge-conv-chain" not in report.counts()
    assert any("dynamic" in d.reason for d in report.declines)
    dims = [d.dim_param or d.dim_value for d in folded.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert [s["x"][0] for s in report.validation.inputs] == [1, 1, 2]
    assert_same_outputs(model, folded, shapes={"x": [2, 3, 7, 9]})
    # Shapes given for validation do not make the model's dims static.
    _, given = graphfold.fold(model, fold_all=True, input_shapes={"x": [1, 3, 12, 10]})
    assert given.counts() == report.counts()


def test_static_dims_allow_the_border_corrected_merge():
    n = Net([1, 3, 12, 10])
    c1 = n.conv(n.x, "pw", 3, 4, kernel=1)
    n.batchnorm(n.conv(c1, "c3", 4, 4, pads=[1, 1, 1, 1]), "y", 4)
    model = n.model("y")
    folded, report = graphfold.fold(model, fold_all=True)
    assert_valid(folded, model)
    assert report.counts()["merge-conv-chain"] == 1
    assert_same_outputs(model, folded)


# --- odd but valid models ---------------------------------------------------------------------

def test_sparse_initializer_is_left_alone():
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 5], np.int64), "i"), [4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Identity", ["m"], ["y"])],
                              "sparse", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4])], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # shape inference cannot see a sparse initializer's shape
    folded, report = graphfold.fold(model)
    onnx.checker.check_model(folded)
    assert op_types(folded) == ["MatMul"]
    assert [s.values.name for s in folded.graph.sparse_initializer] == ["w"]


@pytest.mark.parametrize("attr, value", [("value_floats", [1.0, 2.0, 3.0, 4.0]), ("value_float", 0.5)])
def test_constant_node_float_attributes_fold_as_float32(attr, value):
    nodes = [helper.make_node("Constant", [], ["c"], **{attr: value}), helper.make_node("Add", ["x", "c"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", FLOAT, [1, 4])])
    folded, report = graphfold.fold(model)
    assert op_types(folded) == ["Add"]
    assert [i.data_type for i in folded.graph.initializer] == [TensorProto.FLOAT]
    assert_valid(folded, model)


def test_string_constants_survive_folding():
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.STRING, [1], [b"a"])),
             helper.make_node("Identity", ["c"], ["d"]), helper.make_node("Concat", ["x", "d"], ["y"], axis=0)]
    model = make_model(nodes, [value("x", TensorProto.STRING, [1])], [value("y", TensorProto.STRING, [2])])
    folded, report = fold_only(model, None)  # no random strings to validate with
    assert op_types(folded) == ["Concat"]
    assert_valid(folded, model)
    feeds = {"x": np.array(["b"], dtype=object)}
    assert list(run_ort(folded, feeds)[0]) == list(run_ort(model, feeds)[0]) == ["b", "a"]


def test_a_result_onnxruntime_cannot_load_fails_validation():
    """The candidate failing where the original loads is a failed comparison (exit 1), not bad input."""
    n = Net([1, 4])
    n.op("Add", [n.x, n.const("one", np.ones(4, np.float32))], "y")
    model = n.model("y")
    broken = n.model("y", opset=6)  # onnxruntime has no Add-6 kernel
    result = graphfold.check(model, broken)
    assert not result.passed
    assert "onnxruntime cannot run the optimized model" in result.outputs[0].note
