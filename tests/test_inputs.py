"""Random integer inputs span their dtype, so validation sees where integer arithmetic wraps."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphfold.inputs import make_inputs
from graphfold.validate import compare_models
from tests.util import make_model

INT8 = TensorProto.INT8


def int8_model(*ops: str) -> onnx.ModelProto:
    """x -> ops[0] -> ops[1] ... -> y on an int8 [4, 8] tensor."""
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [a], [b]) for op, a, b in zip(ops, names, names[1:])]
    value = helper.make_tensor_value_info
    return make_model(nodes, [value("x", INT8, [4, 8])], [value("y", INT8, [4, 8])])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint16])
def test_random_integer_inputs_span_the_dtype_including_its_minimum(dtype):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    value = helper.make_tensor_value_info
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [value("x", elem, [4, 8])],
                       [value("y", elem, [4, 8])])
    info = np.iinfo(dtype)
    for seed in (0, 1, 2):
        x = make_inputs(model, seed=seed, full_integers=True)["x"]
        assert x.dtype == dtype and x.min() == info.min and x.max() == info.max
        assert (np.abs(x.astype(np.float64)) <= 3).any()  # values near zero too
    # Benchmarks keep small non-negative integers, valid as indices.
    assert set(np.unique(make_inputs(model)["x"])) <= {0, 1, 2}


def test_validation_catches_a_rewrite_wrong_only_at_the_int8_minimum():
    # Relu(Abs(x)) and Abs(x) differ only at x = -128 (Abs(-128) = -128).
    result = compare_models(int8_model("Abs", "Relu"), int8_model("Abs"))
    assert not result.passed, result.summary()


def test_validation_falls_back_to_small_integers_where_the_original_needs_them():
    # Gather's indices must lie in [-3, 2]: integers over int64 would make onnxruntime fail.
    value = helper.make_tensor_value_info
    table = helper.make_tensor("table", TensorProto.FLOAT, [3, 2], np.arange(6, dtype=np.float32))
    model = make_model([helper.make_node("Gather", ["table", "i"], ["y"])],
                       [value("i", TensorProto.INT64, [5])], [value("y", TensorProto.FLOAT, [5, 2])], [table])
    result = compare_models(model, model)
    assert result.passed, result.summary()
    assert any("small non-negative integers" in note for note in result.notes)
