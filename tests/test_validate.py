"""graphfold.validate and the inputs it feeds: errors per output, seeded feeds, shape resolution."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold.errors import UsageError
from graphfold.inputs import (DEFAULT_DIM, fit_input_values, make_inputs, parse_input_shape, parse_input_value,
                              resolve_shapes)
from graphfold.validate import compare_models, compare_outputs, dtype_rtol
from tests.util import make_model, model_from_text, sample_rate_model

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def scaled_model(factor: float, shape=("N", 3), elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x * factor."""
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    return make_model([helper.make_node("Mul", ["x", "k"], ["y"])],
                      [helper.make_tensor_value_info("x", elem_type, list(shape))],
                      [helper.make_tensor_value_info("y", elem_type, list(shape))],
                      [numpy_helper.from_array(np.array(factor, dtype=np_type), "k")])


# --- one output pair --------------------------------------------------------------------------

def test_equal_outputs_pass():
    a = np.array([1.0, -2.0, 4.0], np.float32)
    err = compare_outputs("y", a, a.copy(), rtol=1e-5, atol=0.0)
    assert err.passed and err.max_abs == 0.0 and err.max_rel == 0.0 and err.scale == 4.0


def test_error_is_relative_to_the_largest_reference_value():
    ref = np.array([1.0, -2.0, 4.0])
    out = ref + np.array([0.0, 4e-5, 0.0])
    err = compare_outputs("y", ref, out, rtol=1e-5, atol=0.0)
    assert err.max_abs == pytest.approx(4e-5, rel=1e-3)
    assert err.max_rel == pytest.approx(1e-5, rel=1e-3)
    assert compare_outputs("y", ref, out, rtol=2e-5, atol=0.0).passed
    assert not compare_outputs("y", ref, out, rtol=5e-6, atol=0.0).passed


@pytest.mark.filterwarnings("error")  # and no RuntimeWarning reaches the user
def test_nan_and_inf_in_the_same_places_count_as_equal():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare_outputs("y", ref, ref.copy(), 1e-5, 0.0).passed
    moved = np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
    err = compare_outputs("y", ref, moved, 1e-5, 0.0)
    assert not err.passed and err.max_abs == np.inf


def test_shape_and_dtype_mismatches_fail():
    ref = np.zeros((2, 3), np.float32)
    assert "shape" in compare_outputs("y", ref, np.zeros((3, 2), np.float32), 1e-5, 0.0).note
    assert "dtype" in compare_outputs("y", ref, np.zeros((2, 3), np.float64), 1e-5, 0.0).note
    assert not compare_outputs("y", ref, np.zeros((3, 2), np.float32), 1e-5, 0.0).passed


def test_integer_outputs_must_match_exactly():
    ref = np.array([1, 2, 3], np.int64)
    assert compare_outputs("i", ref, ref.copy(), 1.0, 1.0).passed
    err = compare_outputs("i", ref, np.array([1, 2, 4], np.int64), 1.0, 1.0)
    assert not err.passed and "1 of 3 elements differ" in err.note


def test_empty_outputs_pass():
    assert compare_outputs("y", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), 1e-5, 0.0).passed


def test_float16_outputs_get_a_looser_tolerance():
    assert dtype_rtol(scaled_model(2.0, elem_type=TensorProto.FLOAT16), 1e-4) == 1e-2
    assert dtype_rtol(scaled_model(2.0), 1e-4) == 1e-4


# --- two models -------------------------------------------------------------------------------

def test_identical_models_pass_with_every_seed_recorded():
    result = compare_models(scaled_model(2.0), scaled_model(2.0), seeds=(0, 1, 2))
    assert result.passed and result.max_abs == 0.0 and result.source == "random"
    # The symbolic batch runs at 1, and at 2 for the last seed.
    assert result.inputs == [{"x": [1, 3]}, {"x": [1, 3]}, {"x": [2, 3]}]
    assert [o.name for o in result.outputs] == ["y"]
    assert "passed" in result.summary()


def test_different_models_fail_with_the_worst_output_named():
    result = compare_models(scaled_model(2.0), scaled_model(2.001), rtol=1e-4)
    assert not result.passed
    assert result.max_rel == pytest.approx(5e-4, rel=1e-2)
    assert "FAILED" in result.summary() and "'y'" in result.summary()
    as_dict = result.to_dict()
    assert {"passed", "outputs", "inputs", "max_abs", "max_rel"} <= set(as_dict)


def test_calibration_feeds_replace_random_ones():
    feeds = [{"x": np.ones((4, 3), np.float32)}]
    result = compare_models(scaled_model(2.0), scaled_model(2.0), feeds=feeds)
    assert result.passed and result.source == "calibration" and result.inputs == [{"x": [4, 3]}]


def test_a_missing_output_fails():
    two = model_from_text(HEADER + 'g (float[2] x) => (float[2] y, float[2] z) { y = Relu(x)\n z = Neg(x) }')
    one = model_from_text(HEADER + 'g (float[2] x) => (float[2] y) { y = Relu(x) }')
    result = compare_models(two, one)
    assert not result.passed and [o.name for o in result.outputs] == ["z"]


def test_a_candidate_that_fails_at_run_time_fails_validation():
    reference = model_from_text(HEADER + 'g (float[N] x) => (float[N] y) { y = Relu(x) }')
    # Same interface, but a Reshape only batch 1 satisfies.
    candidate = model_from_text(HEADER + '''g (float[N] x) => (float[N] y) <int64[1] s = {1}> {
        r = Reshape(x, s)
        y = Relu(r)
    }''')
    result = compare_models(reference, candidate, input_shapes={"x": [3]})
    assert not result.passed and "failed to run" in result.outputs[0].note


def test_an_original_that_cannot_run_is_a_usage_error():
    model = model_from_text(HEADER + '''g (float[N] x) => (float[2] y) <int64[1] s = {2}> {
        y = Reshape(x, s)
    }''')
    with pytest.raises(UsageError, match="cannot run the original model on inputs x:1") as info:
        compare_models(model, model)
    assert "\n" not in str(info.value)


def test_an_original_onnxruntime_cannot_load_is_a_usage_error():
    model = model_from_text('<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'
                            'g (float[2] x) => (float[2] y) { y = com.example.Mystery(x) }')
    with pytest.raises(UsageError, match="onnxruntime cannot run the original model"):
        compare_models(model, model)


# --- input shapes and seeded feeds ------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("input:1,3,224,224", ("input", [1, 3, 224, 224])),
    ("input:1x3x8x8", ("input", [1, 3, 8, 8])),
    ("a:b:2,3", ("a:b", [2, 3])),  # names may hold colons; the dims follow the last one
])
def test_parse_input_shape(spec, expected):
    assert parse_input_shape(spec) == expected


@pytest.mark.parametrize("spec", ["input", "input:", "input:1,,3", "input:-1,3", ":1,3", "input:1,0,3"])
def test_parse_input_shape_refuses(spec):
    with pytest.raises(UsageError, match="bad --input-shape"):
        parse_input_shape(spec)


def image_model() -> onnx.ModelProto:
    return model_from_text(HEADER + 'g (float[N, 3, H, 8] x) => (float[N, 3, H, 8] y) { y = Relu(x) }')


def test_resolve_symbolic_dims():
    assert resolve_shapes(image_model()) == {"x": [1, 3, DEFAULT_DIM, 8]}
    assert resolve_shapes(image_model(), batch=4) == {"x": [4, 3, DEFAULT_DIM, 8]}
    assert resolve_shapes(image_model(), {"x": [2, 3, 5, 8]}) == {"x": [2, 3, 5, 8]}


@pytest.mark.parametrize("shapes,message", [
    ({"x": [1, 3, 8]}, "3 dims given, but the input has rank 4"),
    ({"x": [1, 4, 8, 8]}, "dim 1 is 4, but the model fixes it at 3"),
    ({"image": [1, 3, 8, 8]}, "the model has no input of that name (inputs: x)"),
])
def test_resolve_refuses_shapes_the_model_cannot_take(shapes, message):
    with pytest.raises(UsageError) as info:
        resolve_shapes(image_model(), shapes)
    assert message in str(info.value)
    with pytest.raises(UsageError):
        make_inputs(image_model(), shapes)


def test_input_without_a_shape_needs_one():
    model = image_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UsageError, match="has no shape"):
        resolve_shapes(model)
    assert resolve_shapes(model, {"x": [1, 2]}) == {"x": [1, 2]}


def test_feeds_are_seeded_and_typed():
    model = make_model([helper.make_node("Identity", ["f"], ["f2"]), helper.make_node("Identity", ["i"], ["i2"]),
                        helper.make_node("Identity", ["b"], ["b2"])],
                       [helper.make_tensor_value_info("f", TensorProto.FLOAT16, [2, 3]),
                        helper.make_tensor_value_info("i", TensorProto.INT64, [4]),
                        helper.make_tensor_value_info("b", TensorProto.BOOL, [5])],
                       [helper.make_tensor_value_info(n, t, s) for n, t, s in
                        (("f2", TensorProto.FLOAT16, [2, 3]), ("i2", TensorProto.INT64, [4]),
                         ("b2", TensorProto.BOOL, [5]))])
    feeds = make_inputs(model, seed=3)
    assert feeds["f"].dtype == np.float16 and feeds["f"].shape == (2, 3)
    assert feeds["i"].dtype == np.int64 and set(feeds["i"].tolist()) <= {0, 1, 2}
    assert feeds["b"].dtype == np.bool_
    again = make_inputs(model, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(make_inputs(model, seed=4)["f"], feeds["f"])


def test_initializers_listed_as_inputs_are_not_fed():
    # Older exporters list every initializer among the graph inputs.
    model = scaled_model(2.0)
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, []))
    assert set(make_inputs(model)) == {"x"}


def test_sequence_outputs_are_compared_element_by_element():
    a = np.ones((2, 3), np.float32)
    assert compare_outputs("s", [a, a], [a, a], 1e-4, 1e-6).passed
    worst = compare_outputs("s", [a, a], [a, a + np.float32(0.5)], 1e-4, 1e-6)
    assert not worst.passed and worst.max_abs == pytest.approx(0.5)
    assert not compare_outputs("s", [a, a], [a], 1e-4, 1e-6).passed
    assert compare_outputs("o", None, None, 1e-4, 1e-6).passed  # an empty optional output
    assert not compare_outputs("o", None, [a], 1e-4, 1e-6).passed


# --- weak validation (issue 10) ---------------------------------------------------------------

def scaled_conv(scale: float, bias: float = 0.0) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv (weights * scale, bias) -> y."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * scale).astype(np.float32), "w")
    b = numpy_helper.from_array(np.full(4, bias, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight, b])


def test_validation_is_weak_when_an_output_is_below_the_absolute_tolerance():
    tiny = scaled_conv(5e-8)
    # A wrong model (all zeros) passes: that is what makes the check weak.
    wrong = scaled_conv(0.0)
    result = compare_models(tiny, wrong)
    assert result.passed and result.weak and result.weak_outputs == ["y"]
    assert "within 10x the absolute tolerance" in result.outputs[0].weak
    data = result.to_dict()
    assert data["weak"] is True and data["weak_outputs"] == ["y"]
    warning = result.weak_warning()
    assert warning.startswith("warning: validation is weak") and "'y'" in warning
    assert "--calibration" in warning and "--input-shape" in warning and "--input-value" in warning


def test_validation_is_weak_when_an_output_is_the_same_for_every_input():
    constant = scaled_conv(0.0, bias=0.5)
    result = compare_models(constant, constant)
    assert result.weak and "is the same for every validation input" in result.outputs[0].weak


def test_validation_of_an_ordinary_model_is_not_weak():
    model = scaled_conv(1.0)
    result = compare_models(model, model)
    assert result.passed and not result.weak and result.weak_outputs == []
    assert result.weak_warning() is None and result.to_dict()["weak"] is False


# --- --input-value (issue 10) -----------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("sr:16000", np.array(16000)), ("mask:1,0,1", np.array([1, 0, 1])), ("t:0.5", np.array(0.5)),
    ("flag:true", np.array(True)), ("one:7,", np.array([7])),
])
def test_parse_input_value(spec, expected):
    name, value = parse_input_value(spec)
    assert name == spec.split(":")[0]
    np.testing.assert_array_equal(value, expected)
    assert value.shape == expected.shape


def test_parse_input_value_reads_npy(tmp_path):
    np.save(tmp_path / "state.npy", np.zeros((2, 1, 8), np.float32))
    name, value = parse_input_value(f"state:{tmp_path / 'state.npy'}")
    assert name == "state" and value.shape == (2, 1, 8)


@pytest.mark.parametrize("spec, message", [
    ("sr", "expected NAME:VALUE"), ("sr:", "expected NAME:VALUE"), ("sr:abc", "is not a number"),
    ("sr:/no/such.npy", "cannot read"),
])
def test_parse_input_value_refuses(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_input_value(spec)


def state_model() -> onnx.ModelProto:
    """x [N, 4] float, sr int64 scalar, h [2, N, 3] float, mask [4] float: y = x * mask."""
    nodes = [helper.make_node("Mul", ["x", "mask"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, "N", 3]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [4])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])


def test_fit_input_values_types_and_shapes():
    model = state_model()
    fitted = fit_input_values(model, {"sr": np.array(16000), "h": np.array(0), "mask": np.array([1, 0, 1, 0])})
    assert fitted["sr"].dtype == np.int64 and fitted["sr"].shape == ()
    assert fitted["mask"].dtype == np.float32 and fitted["mask"].tolist() == [1, 0, 1, 0]
    assert fitted["h"].shape == ()  # a scalar fills the tensor, whatever shape it gets
    feeds = make_inputs(model, {"x": [3, 4]}, values=fitted)
    assert feeds["h"].shape == (2, DEFAULT_DIM, 3) and np.all(feeds["h"] == 0) and feeds["h"].dtype == np.float32
    assert feeds["sr"] == 16000 and feeds["x"].shape == (3, 4)
    shaped = fit_input_values(model, {"h": np.arange(6)}, {"h": [2, 1, 3]})
    assert shaped["h"].shape == (2, 1, 3)


@pytest.mark.parametrize("values, shapes, message", [
    ({"rate": 1}, None, "no input of that name"),
    ({"sr": 16000.5}, None, "cannot hold"),
    ({"sr": 2**70}, None, "cannot hold"),
    ({"sr": [1, 2]}, None, "rank 0"),
    ({"mask": [1, 2, 3]}, None, "model fixes it at 4"),
    ({"h": np.arange(5)}, {"h": [2, 1, 3]}, "do not fill"),
    ({"h": np.arange(6)}, None, "give its shape with --input-shape"),
])
def test_fit_input_values_refuses(values, shapes, message):
    with pytest.raises(UsageError, match=message):
        fit_input_values(state_model(), {k: np.asarray(v) for k, v in values.items()}, shapes)


def test_validation_feeds_given_values():
    model = sample_rate_model()
    with pytest.raises(UsageError, match="--input-value"):
        compare_models(model, model)  # random sample rates: onnxruntime fails on the else-branch
    result = compare_models(model, model, input_values=fit_input_values(model, {"sr": 16000}))
    assert result.passed and all(shapes["sr"] == [] for shapes in result.inputs)
