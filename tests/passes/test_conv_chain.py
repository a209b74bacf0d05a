"""merge-conv-chain on 1-4 Conv graphs: exact merges, the cost model's say, one test per decline reason."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.util import Net, assert_declines, assert_folds, assert_same_outputs, conv_attrs, fold_only, make_model, op_types

CHAIN = ["merge-conv-chain"]


# --- exact merges -----------------------------------------------------------------------------

def test_kxk_then_pointwise():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4), "y", 8, 4, 1)
    folded, report = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    assert report.rewrites[0].nodes_removed == ["a", "y"]
    assert conv_attrs(folded)["kernel_shape"] == [3, 3] and conv_attrs(folded)["pads"] == [1] * 4


def test_unpadded_second_conv():
    # A channel bottleneck makes the 5x5 cheaper than the two 3x3s.
    n = Net([1, 2, 10, 10])
    n.conv(n.conv(n.x, "a", 2, 16, 3, pads=[1] * 4), "y", 16, 2, 3)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    assert conv_attrs(folded)["kernel_shape"] == [5, 5]


def test_pointwise_with_bias_then_padded_kxk_adds_the_border_correction():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 64, 1), "y", 64, 4, 3, pads=[1] * 4)
    folded, report = assert_folds(n.model("y"), CHAIN, 1, ["Conv", "Add"])
    assert "border Add" in report.rewrites[0].detail
    border = folded.graph.node[1].input[1]
    [init] = [i for i in folded.graph.initializer if i.name == border]
    assert list(init.dims) == [1, 4, 8, 8]


def test_pointwise_without_bias_then_padded_kxk_is_a_plain_conv():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 64, 1, bias=False), "y", 64, 4, 3, pads=[1] * 4)
    assert_folds(n.model("y"), CHAIN, 1, ["Conv"])


def test_pointwise_without_bias_merges_with_dynamic_dims():
    n = Net(["N", 4, "H", "W"])
    n.conv(n.conv(n.x, "a", 4, 64, 1, bias=False), "y", 64, 4, 3, pads=[1] * 4)
    assert_folds(n.model("y"), CHAIN, 1, ["Conv"], shapes={"x": [2, 4, 9, 7]})


def test_expand_depthwise_project_merges_as_a_whole():
    # No pair of the block pays alone (a dense 3x3 over the expanded channels); all three do.
    n = Net([1, 8, 16, 16])
    n.conv(n.conv(n.conv(n.x, "a", 8, 48, 1), "b", 48, 48, 3, group=48, pads=[1] * 4), "y", 48, 8, 1)
    folded, report = assert_folds(n.model("y"), CHAIN, 1, ["Conv", "Add"])
    assert report.rewrites[0].detail == "3 convs -> 3x3 conv + border Add"
    assert conv_attrs(folded)["group"] == 1


def test_expand_then_depthwise_alone_does_not_pay():
    n = Net([1, 8, 16, 16])
    n.conv(n.conv(n.x, "a", 8, 48, 1), "y", 48, 48, 3, group=48, pads=[1] * 4)
    assert_declines(n.model("y"), CHAIN, "merging does not pay")


def test_weights_are_composed_only_for_the_merge_that_is_made(monkeypatch):
    # The split is chosen from the merged convs' shapes; weights are composed once, for the
    # segment kept (two compositions for three convs), and not at all for a chain declined.
    from graphfold import kernels

    calls = []
    real = kernels.compose
    monkeypatch.setattr(kernels, "compose", lambda a, b: calls.append(1) or real(a, b))
    n = Net([1, 8, 16, 16])
    n.conv(n.conv(n.conv(n.x, "a", 8, 48, 1), "b", 48, 48, 3, group=48, pads=[1] * 4), "y", 48, 8, 1)
    assert_folds(n.model("y"), CHAIN, 1, ["Conv", "Add"])
    assert len(calls) == 2
    calls.clear()
    n = Net([1, 8, 16, 16])
    n.conv(n.conv(n.x, "a", 8, 48, 1), "y", 48, 48, 3, group=48, pads=[1] * 4)
    assert_declines(n.model("y"), CHAIN, "merging does not pay")
    assert calls == []


def test_inverted_residual_folds_to_one_conv_in_the_default_pipeline():
    # Chain merge, then the skip folds into the kernel and the border map rides along as one Add.
    n = Net([1, 8, 16, 16])
    n.conv(n.conv(n.conv(n.x, "a", 8, 48, 1), "b", 48, 48, 3, group=48, pads=[1] * 4), "c", 48, 8, 1)
    n.op("Add", ["c", "x"], "y")
    folded, report = assert_folds(n.model("y"), None, 2, ["Conv", "Add"])
    assert [r.pass_name for r in report.rewrites] == ["merge-conv-chain", "merge-parallel-branches"]


def test_chain_split_where_a_link_is_not_exact():
    # 3x3 -> 1x1 merges; the padded 3x3 after it may not join.
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4), "b", 8, 4, 1), "y", 4, 4, 3, pads=[1] * 4)
    folded, report = fold_only(n.model("y"), CHAIN)
    assert [r.detail for r in report.rewrites] == ["2 convs -> 3x3 conv"]
    assert op_types(folded) == ["Conv", "Conv"]
    assert_same_outputs(n.model("y"), folded)


def test_depthwise_chain_stays_depthwise():
    n = Net([1, 6, 8, 8])
    n.conv(n.conv(n.x, "a", 6, 6, 3, group=6, pads=[1] * 4), "y", 6, 6, 3, group=6)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    assert conv_attrs(folded)["group"] == 6 and conv_attrs(folded)["kernel_shape"] == [5, 5]


def test_depthwise_then_pointwise_becomes_dense():
    n = Net([1, 6, 8, 8])
    n.conv(n.conv(n.x, "a", 6, 6, 3, group=6, pads=[1] * 4), "y", 6, 6, 1)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    assert conv_attrs(folded)["group"] == 1


@pytest.mark.parametrize("groups", [(2, 2), (2, 4)], ids=["same", "finer-second"])
def test_grouped_chain_keeps_the_coarser_grouping(groups):
    n = Net([1, 8, 8, 8])
    n.conv(n.conv(n.x, "a", 8, 8, 3, group=groups[0], pads=[1] * 4), "y", 8, 8, 1, group=groups[1])
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    assert conv_attrs(folded)["group"] == 2


# (input size, first conv, second conv, ops after, fold_all, attributes of the merged conv)
GEOMETRY = {
    "stride-2-odd-input": (9, dict(cout=8, kernel=3, strides=[2, 2], pads=[1] * 4), dict(kernel=1),
                           ["Conv"], False, {"strides": [2, 2]}),
    "two-stride-2-odd-input": (11, dict(cout=8, kernel=3, strides=[2, 2]), dict(kernel=3, strides=[2, 2]),
                               ["Conv"], False, {"strides": [4, 4], "kernel_shape": [7, 7]}),
    # conv2's taps sit s1 * d2 = 2 apart on the input.
    "strided-pointwise-then-padded": (11, dict(cout=32, kernel=1, strides=[2, 2]),
                                      dict(kernel=3, strides=[2, 2], pads=[1] * 4), ["Conv", "Add"], True,
                                      {"strides": [4, 4], "dilations": [2, 2]}),
    "dilated-then-pointwise": (9, dict(cout=8, kernel=3, dilations=[2, 2], pads=[2] * 4), dict(kernel=1),
                               ["Conv"], False, {"dilations": [2, 2]}),
    "pointwise-then-dilated-padded": (9, dict(cout=32, kernel=1), dict(kernel=3, dilations=[2, 2], pads=[2] * 4),
                                      ["Conv", "Add"], True, {"dilations": [2, 2], "kernel_shape": [3, 3]}),
}


@pytest.mark.parametrize("case", list(GEOMETRY))
def test_strides_and_dilations(case):
    size, first, second, ops, fold_all, attrs = GEOMETRY[case]
    n = Net([1, 4, size, size])
    first = dict(first)
    mid = first.pop("cout")
    n.conv(n.conv(n.x, "a", 4, mid, **first), "y", mid, 4, **second)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ops, fold_all=fold_all)
    assert {key: conv_attrs(folded)[key] for key in attrs} == attrs


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_first_conv_with_asymmetric_padding(auto_pad):
    n = Net([1, 4, 9, 9])
    n.conv(n.conv(n.x, "a", 4, 8, 4, auto_pad=auto_pad), "y", 8, 4, 1)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv"])
    # SAME_UPPER puts the odd pad at the end, SAME_LOWER at the beginning.
    assert conv_attrs(folded)["pads"] == ([1, 1, 2, 2] if auto_pad == "SAME_UPPER" else [2, 2, 1, 1])
    assert "auto_pad" not in conv_attrs(folded)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_second_conv_with_border(auto_pad):
    # 3x3 stride 2 on 8x8 pads one pixel on one side only.
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 32, 1), "y", 32, 4, 3, strides=[2, 2], auto_pad=auto_pad)
    folded, _ = assert_folds(n.model("y"), CHAIN, 1, ["Conv", "Add"], fold_all=True)
    assert conv_attrs(folded)["pads"] == ([0, 0, 1, 1] if auto_pad == "SAME_UPPER" else [1, 1, 0, 0])


def test_conv1d_chain():
    n = Net([1, 4, 16])
    n.conv(n.conv(n.x, "a", 4, 8, [3], pads=[1, 1]), "y", 8, 4, [1])
    assert_folds(n.model("y"), CHAIN, 1, ["Conv"])


def test_dynamic_batch_chain():
    n = Net(["N", 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 64, 1), "y", 64, 4, 3, pads=[1] * 4)
    assert_folds(n.model("y"), CHAIN, 1, ["Conv", "Add"], shapes={"x": [3, 4, 8, 8]})


def test_opset_11_chain():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4), "y", 8, 4, 1)
    assert_folds(n.model("y", opset=11), CHAIN, 1, ["Conv"])


conv_spec = st.fixed_dictionaries({
    "kernel": st.sampled_from([1, 2, 3]), "stride": st.sampled_from([1, 2]), "dilation": st.sampled_from([1, 2]),
    "pad": st.sampled_from([0, 1, 2]), "group": st.sampled_from([1, 2, 4]), "bias": st.booleans()})


@settings(max_examples=30, deadline=None)
@given(first=conv_spec, second=conv_spec, size=st.integers(7, 10))
def test_whatever_merges_matches_onnxruntime(first, second, size):
    n = Net([1, 4, size, size])
    for spec, (x, out) in zip((first, second), (("x", "a"), ("a", "y"))):
        pad = spec["pad"] if spec["kernel"] > 1 else 0
        size = (size + 2 * pad - spec["dilation"] * (spec["kernel"] - 1) - 1) // spec["stride"] + 1
        assume(size >= 1)
        n.conv(x, out, 4, 4, spec["kernel"], bias=spec["bias"], group=spec["group"], strides=[spec["stride"]] * 2,
               dilations=[spec["dilation"]] * 2, pads=[pad] * 4)
    model = n.model("y")
    folded, report = fold_only(model, CHAIN, fold_all=True)
    assert len(report.rewrites) + len(report.declines) == 1
    assert_same_outputs(model, folded, seeds=(0,))


# --- the cost model decides -------------------------------------------------------------------

def cost_heavy_chain() -> onnx.ModelProto:
    """3x3 -> unpadded 3x3, 32 -> 32 channels: the 5x5 merge has more MACs than both."""
    n = Net([1, 32, 16, 16])
    n.conv(n.conv(n.x, "a", 32, 32, 3, pads=[1] * 4), "y", 32, 32, 3)
    return n.model("y")


def test_merge_that_does_not_pay_is_declined():
    assert_declines(cost_heavy_chain(), CHAIN, "merging does not pay (estimated cost x1.44); --fold-all merges anyway")


def test_fold_all_merges_what_does_not_pay():
    folded, _ = assert_folds(cost_heavy_chain(), CHAIN, 1, ["Conv"], fold_all=True)
    assert conv_attrs(folded)["kernel_shape"] == [5, 5]


# --- one test per decline reason --------------------------------------------------------------

def test_declines_padded_kxk_after_kxk():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 4, 3, pads=[1] * 4), "y", 4, 4, 3, pads=[1] * 4)
    assert_declines(n.model("y"), CHAIN, "padded 3x3 conv after a 3x3 conv is exact only in the interior")


def test_padded_resnet_block_is_left_unmerged_by_default():
    n = Net([1, 8, 8, 8])
    n.conv(n.conv(n.x, "a", 8, 8, 3, pads=[1] * 4), "b", 8, 8, 3, pads=[1] * 4)
    n.op("Add", ["b", "x"], "y")
    report = assert_declines(n.model("y"), None, "exact only in the interior")
    assert {d.pass_name for d in report.declines} >= {"merge-conv-chain"}


def test_declines_border_correction_with_dynamic_spatial_dims():
    n = Net(["N", 4, "H", "W"])
    n.conv(n.conv(n.x, "a", 4, 64, 1), "y", 64, 4, 3, pads=[1] * 4)
    assert_declines(n.model("y"), CHAIN, "the spatial dims are dynamic, so the constant border correction "
                                         "cannot be built")


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_declines_auto_pad_with_dynamic_spatial_dims(auto_pad):
    n = Net(["N", 4, "H", "W"])
    n.conv(n.conv(n.x, "a", 4, 8, 3, auto_pad=auto_pad), "y", 8, 4, 1)
    assert_declines(n.model("y"), CHAIN, "Conv 'a' uses auto_pad and its input's spatial dims are dynamic")


def test_declines_weights_fed_at_run_time():
    n = Net([1, 4, 8, 8])
    n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4)
    n.conv("a", "y", 8, 4, 1, weight=n.input("w", [4, 8, 1, 1]))
    assert_declines(n.model("y"), CHAIN, "Conv 'y' weights are not float constants")


def test_declines_a_shared_weight():
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 4, 3, pads=[1] * 4), "y", 4, 4, 1)
    n.conv("x", "z", 4, 4, 1, weight="y.w")
    assert_declines(n.model("y", "z"), CHAIN, "Conv 'y' weight is shared with another node")


def test_a_conv_that_may_not_merge_splits_the_chain():
    # c's weight is shared, so c stays; a and b before it still merge.
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4), "b", 8, 4, 1), "c", 4, 4, 1)
    n.conv("x", "z", 4, 4, 1, weight="c.w")
    model = n.model("c", "z")
    folded, report = fold_only(model, CHAIN)
    assert [r.nodes_removed for r in report.rewrites] == [["a", "b"]]
    assert op_types(folded) == ["Conv", "Conv", "Conv"]
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("outputs, reason", [(("y", "z"), "intermediate 'a' is used by 2 nodes"),
                                             (("y", "a"), "intermediate 'a' is a graph output")],
                         ids=["two-readers", "graph-output"])
def test_declines_an_intermediate_that_must_stay(outputs, reason):
    n = Net([1, 4, 8, 8])
    n.conv(n.conv(n.x, "a", 4, 8, 3, pads=[1] * 4), "y", 8, 4, 1)
    if "z" in outputs:
        n.conv("a", "z", 8, 4, 1)
    assert_declines(n.model(*outputs), CHAIN, reason)
