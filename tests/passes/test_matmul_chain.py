"""merge-matmul-chain on 2-4 layer graphs: exact merges, the MAC rule, one test per decline reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphfold.passes.matmul_chain import _best_split
from tests.util import Net, assert_declines, assert_folds, assert_same_outputs, fold_only, make_model, op_types

CHAIN = ["merge-matmul-chain"]


def matmul(n: Net, x: str, out: str, k: int, cols: int, bias: list[int] | None = None,
           bias_first: bool = False) -> str:
    """x @ W (+ a constant of shape ``bias``) -> out."""
    w = n.random(f"{out}.w", [k, cols], k)
    if bias is None:
        return n.op("MatMul", [x, w], out)
    product = n.op("MatMul", [x, w], f"{out}.mm")
    b = n.random(f"{out}.b", bias)
    return n.op("Add", [b, product] if bias_first else [product, b], out)


def gemm(n: Net, x: str, out: str, k: int, cols: int, bias: list[int] | None = None, trans_b: int = 0,
         **attrs) -> str:
    w = n.random(f"{out}.w", [cols, k] if trans_b else [k, cols], k)
    inputs = [x, w] + ([n.random(f"{out}.b", bias)] if bias is not None else [])
    return n.op("Gemm", inputs, out, transB=trans_b, **attrs)


# --- exact merges -----------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
def test_two_gemms_become_one(trans_b):
    n = Net([3, 16])
    gemm(n, gemm(n, "x", "a", 16, 32, bias=[32], alpha=0.5, beta=2.0), "y", 32, 8, bias=[8], trans_b=trans_b,
         alpha=1.5, beta=0.25)
    _, report = assert_folds(n.model("y"), CHAIN, 1, ["Gemm"])
    assert report.rewrites[0].detail == "2 layers -> Gemm 16x8"


def test_gemms_without_bias_become_a_matmul():
    n = Net([3, 16])
    gemm(n, gemm(n, "x", "a", 16, 32), "y", 32, 8)
    assert_folds(n.model("y"), CHAIN, 1, ["MatMul"])


def test_gemm_biases_over_rows():
    # C may be [M, 1] or [M, N]: it broadcasts over the rows, and so does the merged one.
    n = Net([3, 16])
    gemm(n, gemm(n, "x", "a", 16, 32, bias=[3, 1]), "y", 32, 8, bias=[3, 8])
    assert_folds(n.model("y"), CHAIN, 1, ["Gemm"])


def test_matmul_then_gemm_at_opset_11():
    n = Net([5, 16])
    gemm(n, matmul(n, "x", "a", 16, 32), "y", 32, 8, bias=[8])
    assert_folds(n.model("y", opset=11), CHAIN, 1, ["Gemm"])


@pytest.mark.parametrize("bias_first", [False, True])
def test_rank_two_matmuls_with_bias_become_a_gemm(bias_first):
    n = Net([5, 16])
    matmul(n, matmul(n, "x", "a", 16, 32, bias=[32], bias_first=bias_first), "y", 32, 8, bias=[1, 8])
    assert_folds(n.model("y"), CHAIN, 1, ["Gemm"])


@pytest.mark.parametrize("last_bias", [True, False])
def test_rank_three_matmuls_keep_one_bias_add(last_bias):
    n = Net([2, 5, 16])
    matmul(n, matmul(n, "x", "a", 16, 32, bias=[32]), "y", 32, 8, bias=[8] if last_bias else None)
    _, report = assert_folds(n.model("y"), CHAIN, 1, ["MatMul", "Add"])
    assert report.rewrites[0].detail == "2 layers -> MatMul + Add 16x8"


def test_rank_one_input_with_a_scalar_bias():
    n = Net([16])
    matmul(n, matmul(n, "x", "a", 16, 32, bias=[]), "y", 32, 8)
    assert_folds(n.model("y"), CHAIN, 1, ["MatMul", "Add"])


def test_dynamic_batch_without_bias():
    n = Net(["N", 5, 16])
    matmul(n, matmul(n, "x", "a", 16, 32), "y", 32, 8)
    assert_folds(n.model("y"), CHAIN, 1, ["MatMul"], shapes={"x": [2, 5, 16]})


def test_default_pipeline_merges_a_rank_three_chain():
    # fold-affine cannot take a rank-3 shift; the chain merge carries it.
    n = Net([2, 5, 16])
    matmul(n, matmul(n, "x", "a", 16, 32, bias=[32]), "y", 32, 8, bias=[8])
    _, report = assert_folds(n.model("y"), None, 1, ["MatMul", "Add"])
    assert report.rewrites[0].pass_name == "merge-matmul-chain"


# --- the MAC rule -----------------------------------------------------------------------------

def test_equal_macs_merge():
    # K*N2 = 4*4 = K*N1 + N1*N2 = 4*2 + 2*4.
    n = Net([3, 4])
    matmul(n, matmul(n, "x", "a", 4, 2), "y", 2, 4)
    assert_folds(n.model("y"), CHAIN, 1, ["MatMul"])


def bottleneck() -> onnx.ModelProto:
    n = Net([3, 16])
    matmul(n, matmul(n, "x", "a", 16, 4), "y", 4, 16)
    return n.model("y")


def test_declines_a_merge_that_adds_macs():
    assert_declines(bottleneck(), CHAIN, "merging does not pay (128 -> 256 MACs per row); --fold-all merges anyway")


def test_fold_all_merges_a_bottleneck():
    assert_folds(bottleneck(), CHAIN, 1, ["MatMul"], fold_all=True)


def test_long_chain_merges_only_the_part_that_pays():
    # 64 -> 16 -> 8 -> 64: merging the first two saves MACs, taking in the last would add them.
    n = Net([5, 64])
    matmul(n, matmul(n, matmul(n, "x", "a", 64, 16), "b", 16, 8), "y", 8, 64)
    model = n.model("y")
    folded, report = fold_only(model, CHAIN)
    assert [r.detail for r in report.rewrites] == ["2 layers -> MatMul 64x8"]
    assert op_types(folded) == ["MatMul", "MatMul"]
    assert_same_outputs(model, folded)


def test_best_split_by_macs_and_by_count():
    sizes = [(64, 16), (16, 8), (8, 64)]
    assert _best_split(sizes, [(0, 3)], fold_all=False) == [(0, 2), (2, 3)]
    assert _best_split(sizes, [(0, 3)], fold_all=True) == [(0, 3)]


# --- one test per decline reason --------------------------------------------------------------

def test_declines_gemm_with_transposed_input():
    n = Net([16, 3])
    matmul(n, n.op("Gemm", ["x", n.random("g.w", [16, 32])], "g", transA=1), "y", 32, 8)
    assert_declines(n.model("y"), CHAIN, "Gemm 'g' has transA=1 (its input is transposed)")


def test_a_declined_layer_splits_the_chain():
    # The transA Gemm in front cannot join; the two MatMuls after it still merge.
    n = Net([16, 3])
    n.op("Gemm", ["x", n.random("g.w", [16, 32])], "g", transA=1)
    matmul(n, matmul(n, "g", "a", 32, 64), "y", 64, 8)
    _, report = assert_folds(n.model("y"), CHAIN, 1, ["Gemm", "MatMul"])
    assert report.rewrites[0].nodes_removed == ["a", "y"]


def test_declines_integer_weights():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="a"), helper.make_node("MatMul", ["a", "w2"], ["y"], name="y")],
        "test", [helper.make_tensor_value_info("x", TensorProto.INT32, [3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [3, 8])],
        [onnx.numpy_helper.from_array(np.ones((16, 32), np.int32), "w1"),
         onnx.numpy_helper.from_array(np.ones((32, 8), np.int32), "w2")])
    model = make_model(graph.node, graph.input, graph.output, graph.initializer)
    assert_declines(model, CHAIN, "MatMul 'a' weight is not a float constant")


def test_declines_a_batched_weight():
    n = Net([2, 3, 16])
    matmul(n, n.op("MatMul", ["x", n.random("b.w", [2, 16, 32])], "b"), "y", 32, 8)
    assert_declines(n.model("y"), CHAIN, "MatMul 'b' weight is not a 2-D matrix (shape [2, 16, 32])")


def test_declines_a_gemm_bias_fed_at_run_time():
    n = Net([3, 16])
    matmul(n, n.op("Gemm", ["x", n.random("g.w", [16, 32]), n.input("c", [32])], "g"), "y", 32, 8)
    assert_declines(n.model("y"), CHAIN, "Gemm 'g' bias is not a float constant")


def test_declines_a_shared_weight():
    n = Net([3, 16])
    matmul(n, matmul(n, "x", "a", 16, 32), "y", 32, 8)
    n.op("MatMul", ["x", "a.w"], "z")
    assert_declines(n.model("y", "z"), CHAIN, "MatMul 'a' weight is shared with another node")


# --- not a chain at all -----------------------------------------------------------------------

def two_layers_and(extra: str) -> onnx.ModelProto:
    n = Net([3, 16])
    matmul(n, matmul(n, "x", "a", 16, 32), "y", 32, 8)
    if extra == "second-reader":
        n.op("Relu", ["a"], "z")
        return n.model("y", "z")
    if extra == "graph-output":
        return n.model("y", "a")
    if extra == "row-varying-add":
        n = Net([3, 16])
        matmul(n, matmul(n, "x", "a", 16, 32, bias=[3, 32]), "y", 32, 8)
    if extra == "weight-on-the-left":
        n = Net([16, 3])
        n.op("MatMul", [n.random("w", [32, 16]), "x"], "a")
        matmul(n, "a", "y", 3, 8)
    return n.model("y")


@pytest.mark.parametrize("extra, reason", [("second-reader", "intermediate 'a' is used by 2 nodes"),
                                           ("graph-output", "intermediate 'a' is a graph output")])
def test_declines_an_intermediate_that_must_stay(extra, reason):
    assert_declines(two_layers_and(extra), CHAIN, reason)


@pytest.mark.parametrize("extra", ["row-varying-add", "weight-on-the-left"])
def test_not_a_chain(extra):
    model = two_layers_and(extra)
    folded, report = fold_only(model, CHAIN)
    assert report.rewrites == [] and report.declines == []
    assert op_types(folded) == op_types(model)


# --- any chain that merges matches onnxruntime ------------------------------------------------

layer_spec = st.fixed_dictionaries({"kind": st.sampled_from(["matmul", "matmul+add", "gemm"]),
                                    "cols": st.sampled_from([2, 5, 16]), "trans_b": st.integers(0, 1),
                                    "alpha": st.sampled_from([1.0, 0.5])})


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(layer_spec, min_size=2, max_size=4), fold_all=st.booleans())
def test_whatever_merges_matches_onnxruntime(layers, fold_all):
    n = Net([3, 6])
    x, k = "x", 6
    for index, spec in enumerate(layers):
        out = f"l{index}"
        if spec["kind"] == "gemm":
            x = gemm(n, x, out, k, spec["cols"], bias=[spec["cols"]], trans_b=spec["trans_b"], alpha=spec["alpha"])
        else:
            x = matmul(n, x, out, k, spec["cols"], bias=[spec["cols"]] if spec["kind"] == "matmul+add" else None)
        k = spec["cols"]
    model = n.model(x)
    folded, report = fold_only(model, CHAIN, fold_all=fold_all)
    if fold_all:
        assert len(report.rewrites) == 1 and len([o for o in op_types(folded) if o != "Add"]) == 1
    assert_same_outputs(model, folded, seeds=(0,))


def test_declines_a_float16_product_that_overflows():
    value = helper.make_tensor_value_info
    w = np.full((4, 4), 300.0, np.float16)  # each product entry is 4 * 300 * 300 = 360000 > 65504
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
                       [value("x", TensorProto.FLOAT16, [2, 4])], [value("y", TensorProto.FLOAT16, [2, 4])],
                       [onnx.numpy_helper.from_array(w, "w1"), onnx.numpy_helper.from_array(w, "w2")])
    assert_declines(model, CHAIN, "overflow float16", fold_all=True)
