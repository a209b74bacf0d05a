"""The cost model points the way METHODS.md measured on single blocks (C 8-512, H 7-112):
x + 3x3(3x3) -> 5x5 slower, inverted residual (t = 6) -> dense 3x3 faster, RepVGG -> 3x3 faster."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from graphfold import cost
from graphfold.kernels import ConvParams
from tests.util import Net, fold_only

CHANNELS = (8, 16, 32, 64, 128, 256, 512)
SIZES = (7, 14, 28, 56, 112)
GRID = list(itertools.product(CHANNELS, SIZES))


def conv(cin: int, cout: int, kernel: int, pad: int = 0, group: int = 1) -> ConvParams:
    return ConvParams.create(np.zeros((cout, cin // group, kernel, kernel), np.float32), pads=[pad] * 4, group=group)


def fmap(channels: int, size: int) -> list[int]:
    return [1, channels, size, size]


def skip_two_3x3(c: int, h: int) -> tuple[float, float]:
    """x + conv3x3(conv3x3(x)), padding moved to the first conv, against one 5x5 (before, after)."""
    before = cost.conv_cost(conv(c, c, 3, 2), fmap(c, h)) + cost.conv_cost(conv(c, c, 3), fmap(c, h + 2)) \
        + cost.elementwise_cost(fmap(c, h))
    return before, cost.conv_cost(conv(c, c, 5, 2), fmap(c, h))


def inverted_residual(c: int, h: int, t: int = 6) -> tuple[float, float]:
    """x + project(depthwise(expand(x))) against a dense 3x3 plus its border-correction Add."""
    e = t * c
    before = cost.conv_cost(conv(c, e, 1), fmap(c, h)) + cost.conv_cost(conv(e, e, 3, 1, group=e), fmap(e, h)) \
        + cost.conv_cost(conv(e, c, 1), fmap(e, h)) + cost.elementwise_cost(fmap(c, h))
    after = cost.conv_cost(conv(c, c, 3, 1), fmap(c, h)) + cost.elementwise_cost(fmap(c, h), unfusable=True)
    return before, after


def repvgg(c: int, h: int) -> tuple[float, float]:
    """3x3 + 1x1 + BN(x) (a depthwise 1x1, as merge-parallel-branches rates it) and two Adds, against a 3x3."""
    before = cost.conv_cost(conv(c, c, 3, 1), fmap(c, h)) + cost.conv_cost(conv(c, c, 1), fmap(c, h)) \
        + cost.conv_cost(conv(c, c, 1, group=c), fmap(c, h)) + 2 * cost.elementwise_cost(fmap(c, h))
    return before, cost.conv_cost(conv(c, c, 3, 1), fmap(c, h))


@pytest.mark.parametrize("c, h", [(c, h) for c, h in GRID if (c, h) != (8, 7)])
def test_skip_over_two_3x3_merged_to_5x5_is_rated_costlier(c, h):
    # Left out: C 8 at 7x7, where per-node overhead outweighs the MACs. The model rates the 5x5
    # cheaper there (x0.77), and onnxruntime agreed when measured for this test (1 thread, x0.93).
    before, after = skip_two_3x3(c, h)
    assert not cost.pays(before, after), cost.ratio_text(before, after)


@pytest.mark.parametrize("c, h", GRID)
def test_inverted_residual_merged_to_dense_3x3_is_rated_cheaper(c, h):
    before, after = inverted_residual(c, h)
    assert cost.pays(before, after), cost.ratio_text(before, after)


@pytest.mark.parametrize("c, h", GRID)
def test_repvgg_block_merged_to_3x3_is_rated_cheaper(c, h):
    before, after = repvgg(c, h)
    assert cost.pays(before, after), cost.ratio_text(before, after)


def test_a_tie_does_not_pay():
    assert not cost.pays(100.0, 100.0) and cost.pays(100.0, 99.0)
    assert cost.ratio_text(100.0, 150.0) == "estimated cost x1.50"
    assert cost.ratio_text(0.0, 1.0) == "estimated cost unknown"


def test_unknown_shapes_get_a_neutral_guess():
    # Without shapes both sides are priced on the same 32x32 map, so comparisons still hold.
    assert cost.conv_cost(conv(8, 8, 3, 1), None) == cost.conv_cost(conv(8, 8, 3, 1), fmap(8, 32))
    assert cost.conv_cost(conv(8, 8, 3, 1), [None, 8, None, None]) == cost.conv_cost(conv(8, 8, 3, 1), fmap(8, 32))


# --- the default pipeline follows the model -----------------------------------------------------

def block(pattern: str, c: int, h: int) -> onnx.ModelProto:
    n = Net([1, c, h, h])
    if pattern == "skip_3x3_3x3":
        n.conv(n.conv("x", "a", c, c, 3, pads=[2] * 4), "b", c, c, 3)
        n.op("Add", ["x", "b"], "y")
    elif pattern == "inverted_residual":
        n.conv(n.conv(n.conv("x", "a", c, 6 * c, 1), "b", 6 * c, 6 * c, 3, group=6 * c, pads=[1] * 4), "c", 6 * c, c, 1)
        n.op("Add", ["x", "c"], "y")
    else:
        n.conv("x", "a", c, c, 3, pads=[1] * 4)
        n.op("Add", [n.op("Add", ["a", n.conv("x", "b", c, c, 1)], "s"), n.batchnorm("x", "i", c)], "y")
    return n.model("y")


@pytest.mark.parametrize("pattern, merges", [("skip_3x3_3x3", False), ("inverted_residual", True), ("repvgg", True)])
@pytest.mark.parametrize("c, h", [(16, 56), (64, 14)])
def test_default_pipeline_merges_only_what_the_model_rates_cheaper(pattern, merges, c, h):
    _, report = fold_only(block(pattern, c, h), None)
    merged = [r for r in report.rewrites if r.pass_name.startswith("merge-")]
    assert bool(merged) == merges, [r.detail for r in report.rewrites] + [d.reason for d in report.declines]
    if not merges:
        assert any("does not pay" in d.reason for d in report.declines)
