"""merge-parallel-branches and drop-zero-branch on 2-6 node graphs: exact merges, one test per decline."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from tests.util import Net, assert_declines, assert_folds, assert_same_outputs, conv_attrs, fold_only

PARALLEL = ["merge-parallel-branches"]
ZERO = ["drop-zero-branch"]
SAME = [1, 1, 1, 1]


def repvgg_block(shape=(1, 8, 8, 8)) -> onnx.ModelProto:
    """relu(x) -> BN(3x3) + BN(1x1) + BN(identity), as RepVGG trains it."""
    channels = shape[1]
    n = Net(list(shape))
    r = n.op("Relu", ["x"], "r")
    n.batchnorm(n.conv(r, "c3", channels, channels, 3, bias=False, pads=SAME), "b3", channels)
    n.batchnorm(n.conv(r, "c1", channels, channels, 1, bias=False), "b1", channels)
    n.batchnorm(r, "bi", channels)
    n.op("Add", [n.op("Add", ["b3", "b1"], "s"), "bi"], "y")
    return n.model("y")


# --- merge-parallel-branches ------------------------------------------------------------------

def test_repvgg_block_after_batchnorm_folding():
    _, report = assert_folds(repvgg_block(), ["fold-batchnorm", *PARALLEL], 3, ["Relu", "Conv"])
    assert [r.pass_name for r in report.rewrites] == ["fold-batchnorm"] * 2 + PARALLEL
    assert report.rewrites[-1].detail == "3 branches (BatchNormalization, Conv, Conv) -> one 3x3 conv"


def test_repvgg_block_with_a_dynamic_batch():
    assert_folds(repvgg_block(("N", 8, 8, 8)), ["fold-batchnorm", *PARALLEL], 3, ["Relu", "Conv"],
                 shapes={"x": [2, 8, 8, 8]})


def test_acnet_square_and_asymmetric_kernels():
    n = Net([1, 8, 8, 8])
    n.conv("x", "c3", 8, 8, 3, pads=SAME)
    n.conv("x", "c13", 8, 8, [1, 3], pads=[0, 1, 0, 1])
    n.conv("x", "c31", 8, 8, [3, 1], pads=[1, 0, 1, 0])
    n.op("Sum", ["c3", "c13", "c31"], "y")
    folded, _ = assert_folds(n.model("y"), PARALLEL, 1, ["Conv"])
    assert conv_attrs(folded)["kernel_shape"] == [3, 3]


@pytest.mark.parametrize("group", [1, 8], ids=["dense", "depthwise"])
@pytest.mark.parametrize("skip_first", [True, False])
def test_identity_skip_folds_into_the_kernel(group, skip_first):
    n = Net([1, 8, 8, 8])
    n.conv(n.op("Relu", ["x"], "r"), "c", 8, 8, 3, group=group, pads=SAME)
    n.op("Add", ["r", "c"] if skip_first else ["c", "r"], "y")
    folded, _ = assert_folds(n.model("y"), PARALLEL, 1, ["Relu", "Conv"])
    assert conv_attrs(folded)["group"] == group


def test_identity_skip_with_dynamic_dims():
    n = Net(["N", 8, "H", "W"])
    n.conv(n.op("Relu", ["x"], "r"), "c", 8, 8, 3, pads=SAME)
    n.op("Add", ["r", "c"], "y")
    assert_folds(n.model("y"), PARALLEL, 1, ["Relu", "Conv"], shapes={"x": [2, 8, 5, 7]})


def test_identity_skip_at_opset_13():
    n = Net([1, 8, 8, 8])
    n.conv(n.op("Relu", ["x"], "r"), "c", 8, 8, 3, pads=SAME)
    n.op("Add", ["r", "c"], "y")
    assert_folds(n.model("y", opset=13), PARALLEL, 1, ["Relu", "Conv"])


def nested_sum_with_constant(constant_shape) -> onnx.ModelProto:
    """(conv3x3(x) + constant) + conv1x1(x)."""
    n = Net([1, 8, 8, 8])
    n.op("Add", [n.conv("x", "a", 8, 8, 3, pads=SAME), n.random("m", constant_shape)], "s")
    n.op("Add", ["s", n.conv("x", "b", 8, 8, 1)], "y")
    return n.model("y")


def test_nested_sums_with_a_constant_map_keep_one_add():
    _, report = assert_folds(nested_sum_with_constant([1, 8, 8, 8]), PARALLEL, 1, ["Conv", "Add"])
    assert report.rewrites[0].detail.endswith("+ constant Add")


def test_nested_sums_with_a_per_channel_constant_fold_into_the_bias():
    assert_folds(nested_sum_with_constant([8, 1, 1]), PARALLEL, 1, ["Conv"])


def test_branches_with_stride_two_and_aligned_pads():
    # 3x3 pad 1 and 1x1 pad 0 read the same centre at any input size.
    n = Net([1, 8, 9, 9])
    n.conv("x", "a", 8, 8, 3, strides=[2, 2], pads=SAME)
    n.conv("x", "b", 8, 8, 1, strides=[2, 2])
    n.op("Add", ["a", "b"], "y")
    assert_folds(n.model("y"), PARALLEL, 1, ["Conv"])


def test_fold_all_merges_what_does_not_pay():
    n = Net([1, 64, 32, 32])
    n.conv("x", "a", 64, 64, [1, 3], pads=[0, 1, 0, 1])
    n.conv("x", "b", 64, 64, [3, 1], pads=[1, 0, 1, 0])
    n.op("Add", ["a", "b"], "y")
    model = n.model("y")
    assert_declines(model, PARALLEL, "merging does not pay (estimated cost x1.34); --fold-all merges anyway")
    assert_folds(model, PARALLEL, 1, ["Conv"], fold_all=True)


def test_a_merge_that_does_not_pay_is_declined_before_its_weights_are_summed(monkeypatch):
    from graphfold import kernels

    def no_weight_math(branches):
        raise AssertionError("merged weights computed for a merge that is declined")

    n = Net([1, 64, 32, 32])
    n.conv("x", "a", 64, 64, [1, 3], pads=[0, 1, 0, 1])
    n.conv("x", "b", 64, 64, [3, 1], pads=[1, 0, 1, 0])
    n.op("Add", ["a", "b"], "y")
    monkeypatch.setattr(kernels, "merge_parallel", no_weight_math)
    assert_declines(n.model("y"), PARALLEL, "merging does not pay (estimated cost x1.34); --fold-all merges anyway")


def test_mixed_groups_decide_on_the_merged_weights():
    """A dense 1x1 that is really diagonal beside a depthwise 3x3 merges into a depthwise 3x3: the
    shape alone (group 1, a dense 3x3) would not pay, the weights show that it does."""
    n = Net([1, 16, 16, 16])
    n.conv("x", "d", 16, 16, 3, group=16, pads=SAME)
    diagonal = np.zeros((16, 16, 1, 1), np.float32)
    diagonal[np.arange(16), np.arange(16), 0, 0] = np.linspace(0.5, 1.5, 16)
    n.conv("x", "p", 16, 16, 1, weight=n.const("p.w", diagonal))
    n.op("Add", ["d", "p"], "y")
    folded, _ = assert_folds(n.model("y"), PARALLEL, 1, ["Conv"])
    assert conv_attrs(folded)["group"] == 16


# --- merge-parallel-branches: one test per decline reason -------------------------------------

def test_declines_different_strides():
    n = Net([1, 8, 5, 5])
    n.conv("x", "a", 8, 8, 3)
    n.conv("x", "b", 8, 8, 1, strides=[2, 2])
    n.op("Add", ["a", "b"], "y")
    assert_declines(n.model("y"), PARALLEL, "strides differ: branch 0 has (1, 1), branch 1 has (2, 2)")


def test_declines_misaligned_padding():
    # Same output size on 8x8 only; the extents 3 and 2 cannot be centred in one another.
    n = Net([1, 8, 8, 8])
    n.conv("x", "a", 8, 8, 3, strides=[2, 2], pads=SAME)
    n.conv("x", "b", 8, 8, 2, strides=[2, 2])
    n.op("Add", ["a", "b"], "y")
    assert_declines(n.model("y"), PARALLEL, "padding does not align on spatial axis 0")


def test_declines_branches_on_different_inputs():
    n = Net([1, 8, 8, 8])
    n.conv("x", "a", 8, 8, 3, pads=SAME)
    n.conv(n.input("x2", [1, 8, 8, 8]), "b", 8, 8, 1)
    n.op("Add", ["a", "b"], "y")
    assert_declines(n.model("y"), PARALLEL, "branches read different tensors")


def test_declines_a_skip_that_broadcasts_over_channels():
    n = Net([1, 8, 8, 8])
    n.conv(n.op("Relu", ["x"], "r"), "c", 8, 1, 3, pads=SAME)
    n.op("Add", ["r", "c"], "y")
    assert_declines(n.model("y"), PARALLEL, "channels differ")


def test_declines_a_training_mode_batchnorm_branch():
    n = Net([1, 8, 8, 8])
    n.conv("x", "a", 8, 8, 3, pads=SAME)
    n.batchnorm("x", "b", 8)
    bn = n.nodes[-1]
    bn.output.extend(["running_mean", "running_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    n.op("Add", ["a", "b"], "y")
    assert_declines(n.model("y"), PARALLEL, "a BatchNormalization branch is not in inference mode")


def test_a_constant_map_on_dynamic_dims_stays_an_add_after_the_merged_conv():
    # The map may broadcast the sum (W of 1 grows to 8); after the merged conv it still does.
    n = Net(["N", 8, "H", "W"])
    n.op("Add", [n.conv("x", "a", 8, 8, 3, pads=SAME), n.random("m", [1, 8, 1, 8])], "s")
    n.op("Add", ["s", n.conv("x", "b", 8, 8, 1)], "y")
    model = n.model("y")
    for shape in ([2, 8, 5, 1], [1, 8, 5, 8]):
        assert_folds(model, PARALLEL, 1, ["Conv", "Add"], shapes={"x": shape}, fold_all=True)


def test_declines_a_shared_weight():
    n = Net([1, 8, 8, 8])
    n.conv("x", "a", 8, 8, 3, pads=SAME)
    n.conv("x", "b", 8, 8, 1)
    n.conv("x", "z", 8, 8, 1, weight="b.w")
    n.op("Add", ["a", "b"], "y")
    assert_declines(n.model("y", "z"), PARALLEL, "Conv 'b' weight is shared with another node")


def test_declines_auto_pad_on_dynamic_dims():
    n = Net(["N", 8, "H", "W"])
    n.conv(n.op("Relu", ["x"], "r"), "c", 8, 8, 3, auto_pad="SAME_UPPER")
    n.op("Add", ["r", "c"], "y")
    assert_declines(n.model("y"), PARALLEL, "Conv 'c' uses auto_pad and its input's spatial dims are dynamic")


# --- drop-zero-branch -------------------------------------------------------------------------

def zero_residual(shape=(1, 8, 8, 8)) -> onnx.ModelProto:
    """r + BN(conv(r)) with the BN's gamma = beta = 0: the branch is zero once BN is folded."""
    n = Net(list(shape))
    r = n.op("Relu", ["x"], "r")
    n.batchnorm(n.conv(r, "c", 8, 8, 3, pads=SAME), "z", 8, zero=True)
    n.op("Add", [r, "z"], "y")
    return n.model("y")


@pytest.mark.parametrize("shape", [(1, 8, 8, 8), ("N", 8, 8, 8)], ids=["static", "dynamic-batch"])
def test_zero_branch_goes_after_batchnorm_folding(shape):
    shapes = {"x": [2, 8, 8, 8]} if shape[0] == "N" else None
    _, report = assert_folds(zero_residual(shape), ["fold-batchnorm", *ZERO], 2, ["Relu"], shapes=shapes)
    assert [r.pass_name for r in report.rewrites] == ["fold-batchnorm", *ZERO]


def zero_conv(n: Net, x: str, out: str, cin: int = 8, cout: int = 8) -> str:
    return n.conv(x, out, cin, cout, 3, bias=False, pads=SAME,
                  weight=n.const(f"{out}.w", np.zeros((cout, cin, 3, 3), np.float32)))


def test_zero_summand_leaves_a_smaller_sum():
    n = Net([1, 8, 8, 8])
    n.op("Sum", [n.op("Relu", ["x"], "r"), zero_conv(n, "x", "c"), n.op("Neg", ["x"], "q")], "y")
    _, report = assert_folds(n.model("y"), ZERO, 1, ["Relu", "Neg", "Sum"])
    assert report.rewrites[0].detail == "dropped zero branch Conv 'c' from Sum 'y'"


def test_zero_branch_declines_a_sum_it_would_broadcast():
    n = Net([1, 8, 1, 1])
    n.op("Add", [n.op("Relu", ["x"], "r"), zero_conv(n, n.input("x2", [1, 8, 8, 8]), "c")], "y")
    assert_declines(n.model("y"), ZERO, "cannot prove the zero branch does not broadcast the sum to a larger shape")


def test_zero_branch_declines_a_sum_whose_other_terms_are_smaller():
    n = Net([1, 8, 1, 1])
    big = n.input("x2", [1, 8, 8, 8])
    n.op("Sum", [n.op("Relu", ["x"], "r"), n.op("Neg", ["x"], "q"), zero_conv(n, big, "c")], "y")
    assert_declines(n.model("y"), ZERO, "cannot prove the zero branch does not broadcast the sum to a larger shape")


def test_zero_branch_declines_symbolic_spatial_dims():
    # Only the batch axis may be symbolic: a symbolic H could be 1 on the kept side.
    n = Net(["N", 8, "H", "W"])
    other = n.input("x2", ["N", 8, "H2", "W2"])
    n.op("Add", [n.op("Relu", ["x"], "r"), zero_conv(n, other, "c")], "y")
    assert_declines(n.model("y"), ZERO, "cannot prove the zero branch does not broadcast the sum to a larger shape")


def test_zero_branch_declines_when_the_graph_output_would_be_the_input():
    n = Net([1, 8, 8, 8])
    n.op("Add", ["x", zero_conv(n, "x", "c")], "y")
    assert_declines(n.model("y"), ZERO, "graph output 'y' would become a graph input or constant")


def test_zero_branch_declines_when_both_tensors_are_graph_outputs():
    n = Net([1, 8, 8, 8])
    n.op("Add", [n.op("Relu", ["x"], "r"), zero_conv(n, "x", "c")], "y")
    assert_declines(n.model("y", "r"), ZERO, "'r' and 'y' are both graph outputs")


# --- any sum of branches that merges matches onnxruntime --------------------------------------

branch_spec = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv", "conv", "identity", "batchnorm"]), "kernel": st.sampled_from([1, 2, 3, 5]),
    "dilation": st.sampled_from([1, 2]), "pad_begin": st.integers(0, 2), "group": st.sampled_from([1, 4])})


def test_whatever_merges_matches_onnxruntime():
    merged = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(branches=st.lists(branch_spec, min_size=2, max_size=3), stride=st.sampled_from([1, 2]))
    def case(branches, stride):
        merged.append(_fold_branch_sum(branches, stride))

    case()
    # A property that holds because every case declines tests nothing.
    assert sum(merged) >= len(merged) // 3, f"only {sum(merged)} of {len(merged)} cases merged"


def _fold_branch_sum(branches: list[dict], stride: int) -> bool:
    """Whether the sum of ``branches`` merged; either way the result matches onnxruntime."""
    # Each conv gets the end padding that keeps its output at the size of the first branch's.
    n = Net([1, 4, 9, 9])
    size = None
    terms = []
    for index, spec in enumerate(branches):
        if spec["kind"] != "conv":
            # Identity and BatchNorm keep the 9x9 map.
            assume(stride == 1 and size in (None, 9))
            size = 9
            terms.append("x" if spec["kind"] == "identity" else n.batchnorm("x", f"n{index}", 4))
            continue
        extent, begin = spec["dilation"] * (spec["kernel"] - 1) + 1, spec["pad_begin"]
        end = (size - 1) * stride + extent - 9 - begin if size is not None else begin
        assume(end >= 0 and 9 + begin + end >= extent)
        size = (9 + begin + end - extent) // stride + 1
        terms.append(n.conv("x", f"c{index}", 4, 4, spec["kernel"], group=spec["group"], strides=[stride] * 2,
                            dilations=[spec["dilation"]] * 2, pads=[begin, begin, end, end]))
    assume(any(spec["kind"] == "conv" for spec in branches))
    n.op("Sum", terms, "y")
    model = n.model("y")
    folded, report = fold_only(model, PARALLEL, fold_all=True)
    assert len(report.rewrites) + len(report.declines) >= 1
    assert_same_outputs(model, folded, seeds=(0,))
    return bool(report.rewrites)
