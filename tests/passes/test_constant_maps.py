"""sink-constant-adds on 2-4 node graphs: constant maps move through linear Convs and combine."""
from __future__ import annotations

import numpy as np

from tests.util import Net, assert_declines, assert_folds

SINK = ["sink-constant-adds"]


def map_conv_map(batch: int, first_batch: int, second_batch: int = 1, seed: int = 0) -> Net:
    """Add(x, c1) -> Conv(3x3, pad 1) -> Add(c2), maps with the given batch dims."""
    n = Net([batch, 4, 8, 8], seed=seed)
    c1 = n.const("c1", n.rng.standard_normal((first_batch, 4, 8, 8)).astype(np.float32))
    c2 = n.const("c2", n.rng.standard_normal((second_batch, 4, 8, 8)).astype(np.float32))
    a = n.op("Add", ["x", c1], "a")
    conv = n.conv(a, "conv", 4, 4, pads=[1, 1, 1, 1])
    n.op("Add", [conv, c2], "y")
    return n


def test_sink_a_map_through_a_conv_and_combine():
    assert_folds(map_conv_map(1, 1).model("y"), SINK, 2, ["Conv", "Add"])


def test_sink_constant_adds_with_a_batch_2_map_folds_exactly():
    # Was exit 3 (an internal error): the map's batch dim of 2 did not broadcast to [1, C, H, W].
    assert_folds(map_conv_map(2, 2).model("y"), SINK, 2, ["Conv", "Add"])


def test_sink_declines_a_map_that_would_broadcast_a_dynamic_batch():
    n = map_conv_map(1, 2)
    model = n.model("y")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert_declines(model, SINK, "the constant could broadcast the tensor to a larger shape")


def test_sink_declines_dynamic_spatial_dims():
    n = Net(["N", 4, "H", "W"])
    a = n.op("Add", ["x", n.const("c1", np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1))], "a")
    conv = n.conv(a, "conv", 4, 4, pads=[1, 1, 1, 1])
    n.op("Add", [conv, n.const("c2", np.ones((1, 4, 1, 1), np.float32))], "y")
    assert_declines(n.model("y"), SINK, "channel and spatial dims are not static")
