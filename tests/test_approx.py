"""Approximate folding on small graphs with planted near-identities: every rewrite, its decline
reasons, the tolerance budget, the rollback path, the report, and a ResNet-20-style end to end."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfold
from graphfold import cli
from graphfold.approx import ApproxOptions
from graphfold.passes.approximate import learned_scales
from graphfold.errors import UsageError
from tests.util import make_model, op_types, run_ort

FLOAT = TensorProto.FLOAT


class Net:
    """A tiny CNN built node by node; weights seeded."""

    def __init__(self, channels: int = 4, size: int = 8, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels, self.size = channels, size

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, stride: int = 1, scale: float = 1.0,
             pad: bool = True) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)) * scale
        b = self.rng.standard_normal(cout) * 0.1 * scale
        self.nodes.append(helper.make_node("Conv", [x, self.const(f"{name}.w", w), self.const(f"{name}.b", b)],
                                           [name], name=name, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2 if pad else 0] * 4))
        return name

    def op(self, op: str, inputs: Sequence[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def prelu(self, x: str, name: str, slope: float, channels: int) -> str:
        return self.op("PRelu", [x, self.const(f"{name}.slope", np.full((channels, 1, 1), slope))], name)

    def model(self, out: str, out_shape: Sequence, in_shape: Sequence | None = None) -> onnx.ModelProto:
        in_shape = in_shape or ["N", self.channels, self.size, self.size]
        return make_model(self.nodes, [helper.make_tensor_value_info("x", FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info(out, FLOAT, list(out_shape))], self.inits)


def calibration(samples: int = 16, channels: int = 4, size: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, channels, size, size)).astype(np.float32)}


def relative_error(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    ref, out = run_ort(a, feeds)[0], run_ort(b, feeds)[0]
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def approximate(report) -> list:
    return [r for r in report.rewrites if not r.exact]


def declines(report, pass_name: str) -> list[str]:
    return [d.reason for d in report.declines if d.pass_name == pass_name]


def conv_prelu_conv(slope: float = 0.95, op: str = "PRelu") -> onnx.ModelProto:
    """x -> Conv1x1 -> PRelu/LeakyRelu -> Conv1x1 -> y: removing the activation lets the convs merge."""
    net = Net()
    h = net.conv("x", "c1", 4, 4, k=1)
    if op == "PRelu":
        h = net.prelu(h, "act", slope, 4)
    else:
        h = net.op("LeakyRelu", [h], "act", alpha=slope)
    net.conv(h, "y", 4, 4, k=1)
    return net.model("y", ["N", 4, 8, 8])


def residual(scale: float = 1e-6, projection: bool = False, learned: float | None = None) -> onnx.ModelProto:
    """x -> Conv -> [skip + Conv(PRelu(Conv))] -> y; the branch's last conv scaled by ``scale``."""
    net = Net()
    x = net.conv("x", "stem", 4, 4)
    h = net.conv(x, "b.c1", 4, 4, stride=2 if projection else 1)
    h = net.prelu(h, "b.act", 0.25, 4)
    h = net.conv(h, "b.c2", 4, 4, scale=scale)
    if learned is not None:
        h = net.op("Mul", [h, net.const("b.scale", np.array([learned]))], "b.scaled")
    skip = net.conv(x, "b.proj", 4, 4, k=1, stride=2) if projection else x
    net.op("Add", [skip, h], "y")
    size = 4 if projection else 8
    return net.model("y", ["N", 4, size, size])


# --- snap-activation ------------------------------------------------------------------------------

def test_prelu_with_slope_095_is_removed_and_the_convs_then_merge():
    model, cal = conv_prelu_conv(0.95), calibration()
    folded, report = graphfold.fold(model, calibration=cal, tolerance=0.2, snap_slope=0.9)
    assert op_types(folded) == ["Conv"]
    [snap] = approximate(report)
    assert snap.pass_name == "snap-activation" and not snap.exact and 0 < snap.error_bound <= 0.2
    assert "merge-conv-chain" in report.counts()
    assert relative_error(model, folded, cal) <= 0.2
    assert report.validation.passed and report.validation.source == "calibration"
    assert report.validation.rtol == 0.2


def test_leaky_relu_near_one_is_removed():
    folded, report = graphfold.fold(conv_prelu_conv(0.97, op="LeakyRelu"), calibration=calibration(),
                                    tolerance=0.2, snap_slope=0.95)
    assert "LeakyRelu" not in op_types(folded) and report.counts()["snap-activation"] == 1


def test_slope_further_from_one_than_snap_slope_allows_is_declined():
    folded, report = graphfold.fold(conv_prelu_conv(0.5), calibration=calibration(), tolerance=1.0,
                                    snap_slope=0.9)
    assert "PRelu" in op_types(folded)
    assert declines(report, "snap-activation") == ["slope 0.5 is further from 1 than --snap-slope 0.9 allows"]


def test_snap_that_exceeds_the_tolerance_is_declined_with_the_numbers():
    folded, report = graphfold.fold(conv_prelu_conv(0.95), calibration=calibration(), tolerance=1e-6,
                                    snap_slope=0.9)
    assert "PRelu" in op_types(folded) and not approximate(report)
    [reason] = declines(report, "snap-activation")
    assert reason.startswith("would add error") and "> remaining tolerance 1e-06" in reason
    # Nothing approximate kept: the default exact check, on the calibration data given.
    assert report.validation.source == "calibration" and report.validation.rtol == 1e-4


def test_relu_never_negative_on_the_data_is_removed_and_one_that_is_stays():
    net = Net()
    net.conv(net.op("Relu", ["x"], "relu"), "y", 4, 4, k=1)
    model = net.model("y", ["N", 4, 8, 8])
    positive = {"x": np.abs(calibration()["x"])}
    folded, report = graphfold.fold(model, calibration=positive, tolerance=1e-3, snap_slope=0.99)
    assert op_types(folded) == ["Conv"] and report.rewrites[-1].error_bound == 0
    folded, report = graphfold.fold(model, calibration=calibration(), tolerance=1e-3, snap_slope=0.99)
    assert op_types(folded) == ["Relu", "Conv"] and not declines(report, "snap-activation")


def test_tolerance_zero_declines_every_approximation():
    model = conv_prelu_conv(0.999)
    folded, report = graphfold.fold(model, calibration=calibration(), snap_slope=0.99)
    exact, _ = graphfold.fold(model)
    assert op_types(folded) == op_types(exact)
    assert "allows exact rewrites only" in declines(report, "snap-activation")[0]


# --- residual branches ----------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True])
def test_epsilon_branch_is_dropped(projection):
    model, cal = residual(1e-6, projection), calibration()
    folded, report = graphfold.fold(model, calibration=cal, tolerance=1e-3, epsilon=1e-4)
    [drop] = approximate(report)
    assert drop.pass_name == "drop-epsilon-branch" and "max|F|" in drop.detail
    assert {"b.c1", "b.act", "b.c2"} <= set(drop.nodes_removed) and "b.proj" not in drop.nodes_removed
    assert "Add" not in op_types(folded) and "PRelu" not in op_types(folded)
    assert relative_error(model, folded, cal) <= 1e-3


def test_projection_branch_drop_lets_stem_and_projection_merge():
    folded, report = graphfold.fold(residual(1e-6, projection=True), calibration=calibration(),
                                    tolerance=1e-3, epsilon=1e-4)
    # stem 3x3 -> 1x1 stride-2 projection: an exact chain once the branch is gone.
    assert op_types(folded) == ["Conv"] and report.counts()["merge-conv-chain"] == 1


def test_branch_above_epsilon_is_declined_with_its_max():
    folded, report = graphfold.fold(residual(1.0), calibration=calibration(), tolerance=1e-3, epsilon=1e-4)
    assert "Add" in op_types(folded)
    [reason] = declines(report, "drop-epsilon-branch")
    assert reason.startswith("max|F| = ") and reason.endswith("> --epsilon 0.0001")


def test_epsilon_branch_over_the_tolerance_is_declined():
    _, report = graphfold.fold(residual(1e-2), calibration=calibration(), tolerance=1e-6, epsilon=1.0)
    assert not approximate(report) and declines(report, "drop-epsilon-branch")[0].startswith("would add error")


def two_block_net(scales=(0.5, 0.05), learned=None) -> onnx.ModelProto:
    net = Net()
    x = net.conv("x", "stem", 4, 4)
    for i, scale in enumerate(scales):
        h = net.conv(net.prelu(net.conv(x, f"b{i}.c1", 4, 4), f"b{i}.act", 0.25, 4), f"b{i}.c2", 4, 4, scale=scale)
        if learned is not None:
            h = net.op("Mul", [h, net.const(f"b{i}.scale", np.array([learned[i]]))], f"b{i}.scaled")
        x = net.op("Add", [x, h], f"b{i}.add")
    net.op("Relu", [x], "y")
    return net.model("y", ["N", 4, 8, 8])


def test_drop_branches_removes_the_least_important_first():
    _, report = graphfold.fold(two_block_net(), calibration=calibration(), tolerance=0.5, drop_branches=1)
    [drop] = approximate(report)
    assert drop.pass_name == "drop-ranked-branch" and drop.nodes_removed[0] == "b1.add"
    assert any("measured contribution" in n for n in report.notes)


def test_learned_branch_scales_rank_the_branches():
    model = two_block_net(scales=(0.05, 0.5), learned=(0.01, 0.9))
    assert learned_scales(model) == pytest.approx({"b0.add": 0.01, "b1.add": 0.9})
    _, report = graphfold.fold(model, calibration=calibration(), tolerance=0.5, drop_branches=1)
    assert [r.nodes_removed[0] for r in approximate(report)] == ["b0.add"]
    assert any("learned branch scales" in n for n in report.notes)


def test_target_depth_keeps_dropping_until_reached():
    model = two_block_net()
    folded, report = graphfold.fold(model, calibration=calibration(), tolerance=1.0, target_depth=3)
    assert report.before["depth"] == 5 and report.after["depth"] <= 3
    assert len(approximate(report)) == 1


def test_drop_branches_stops_at_the_tolerance_and_says_so():
    _, report = graphfold.fold(two_block_net(scales=(1.0, 1.0)), calibration=calibration(), tolerance=1e-4,
                               drop_branches=2)
    assert not approximate(report)
    assert all("remaining tolerance" in r for r in declines(report, "drop-ranked-branch"))
    assert any("dropped 0" in n for n in report.notes)


# --- interior-exact merges ------------------------------------------------------------------------

def conv3_conv3(channels: int = 4) -> onnx.ModelProto:
    net = Net(channels)
    net.conv(net.conv("x", "c1", channels, channels), "y", channels, channels)
    return net.model("y", ["N", channels, 8, 8])


def test_allow_border_merges_padded_convs_within_the_tolerance():
    model, cal = conv3_conv3(), calibration()
    folded, report = graphfold.fold(model, calibration=cal, tolerance=1.0, allow_border=True)
    assert op_types(folded) == ["Conv"] and folded.graph.node[0].attribute[0].ints == [5, 5]
    [merge] = approximate(report)
    assert merge.pass_name == "merge-conv-border" and merge.error_bound > 0
    assert relative_error(model, folded, cal) <= 1.0


def test_border_merge_declines():
    # 32 channels: a 5x5 costs more than two 3x3s (at 4, node overhead dominates and it pays).
    _, report = graphfold.fold(conv3_conv3(32), calibration=calibration(channels=32), tolerance=1.0,
                               allow_border=True)
    assert "merging does not pay" in declines(report, "merge-conv-border")[0]
    folded, report = graphfold.fold(conv3_conv3(), calibration=calibration(), tolerance=1e-6, allow_border=True)
    assert len(folded.graph.node) == 2 and "would add error" in declines(report, "merge-conv-border")[0]


# --- selection, rollback, report ------------------------------------------------------------------

def test_greedy_keeps_the_total_within_the_tolerance():
    # Three PRelus each adding about the same error: the tolerance admits some, not all.
    net = Net()
    h = "x"
    for i in range(3):
        h = net.prelu(net.conv(h, f"c{i}", 4, 4, k=1), f"a{i}", 0.9, 4)
    model, cal = net.model(h, ["N", 4, 8, 8]), calibration()
    _, alone = graphfold.fold(model, calibration=cal, tolerance=1.0, snap_slope=0.8)
    errors = sorted(r.error_bound for r in approximate(alone))
    tolerance = errors[0] * 1.5
    folded, report = graphfold.fold(model, calibration=cal, tolerance=tolerance, snap_slope=0.8)
    assert 1 <= len(approximate(report)) < 3 and declines(report, "snap-activation")
    assert relative_error(model, folded, cal) <= tolerance
    assert report.approximate["measured_error"] <= tolerance


def test_rollback_undoes_a_candidate_that_breaks_the_tolerance_on_the_full_data():
    # The Relu's input is never negative on the 4 samples the selection sees, but is on sample 6:
    # selected, then the final validation on all 8 fails and bisection undoes it.
    net = Net()
    net.conv(net.op("Relu", ["x"], "relu"), "y", 4, 4, k=1)
    model = net.model("y", ["N", 4, 8, 8])
    data = np.abs(calibration(8)["x"])
    data[6] -= 1.0
    options = ApproxOptions(tolerance=1e-2, snap_slope=0.99, selection_samples=4)
    folded, report = graphfold.fold(model, calibration={"x": data}, approx_options=options)
    assert op_types(folded) == ["Relu", "Conv"] and not approximate(report)
    [undone] = report.approximate["rolled_back"]
    assert undone["nodes"] == ["relu"] and "rolled back" in undone["reason"] and "> --tolerance 0.01" in undone["reason"]
    assert any(r.startswith("rolled back") for r in declines(report, "snap-activation"))
    assert "rolled back" in report.summary()


def test_rollback_keeps_the_innocent_rewrites():
    net = Net()
    h = net.prelu(net.conv(net.op("Relu", ["x"], "relu"), "c0", 4, 4, k=1), "a0", 0.999, 4)
    net.conv(h, "y", 4, 4, k=1)
    model = net.model("y", ["N", 4, 8, 8])
    data = np.abs(calibration(8)["x"])
    data[6] -= 1.0
    options = ApproxOptions(tolerance=1e-2, snap_slope=0.99, selection_samples=4)
    folded, report = graphfold.fold(model, calibration={"x": data}, approx_options=options)
    assert [r.nodes_removed for r in approximate(report)] == [["a0"]]
    assert [u["nodes"] for u in report.approximate["rolled_back"]] == [["relu"]]
    assert relative_error(model, folded, {"x": data}) <= 1e-2


def test_report_fields_and_summary():
    _, report = graphfold.fold(conv_prelu_conv(0.95), calibration=calibration(), labels=np.arange(16) % 4,
                               tolerance=0.2, snap_slope=0.9)
    data = report.to_dict()
    assert data["calibration"]["source"] == "calibration arrays" and data["calibration"]["samples"] == 16
    assert data["approximate"]["tolerance"] == 0.2 and data["approximate"]["measured_error"] <= 0.2
    assert data["accuracy"] is None  # a conv output has no classes axis to score
    json.loads(report.to_json())
    summary = report.summary()
    assert "approximate folding (--tolerance 0.2" in summary and "total relative output error" in summary


def test_accuracy_before_and_after_with_labels():
    net = Net()
    net.op("Flatten", [net.op("GlobalAveragePool", [net.prelu(net.conv("x", "c", 4, 4), "a", 0.95, 4)], "gap")], "y")
    model, cal = net.model("y", ["N", 4]), calibration()
    labels = run_ort(model, cal)[0].argmax(axis=1)
    _, report = graphfold.fold(model, calibration=cal, labels=labels, tolerance=0.5, snap_slope=0.9)
    assert report.accuracy["before"] == 1.0 and 0 <= report.accuracy["after"] <= 1
    assert "top-1 accuracy on 16 labelled calibration samples: 100.00%" in report.summary()


def test_random_calibration_is_said_to_be_weaker():
    _, report = graphfold.fold(conv_prelu_conv(0.95), tolerance=0.2, snap_slope=0.9, input_shapes={"x": [1, 4, 8, 8]})
    assert report.calibration["random"] and any("weaker" in n for n in report.notes)
    assert "seeded random inputs" in report.summary()


def test_default_behaviour_is_unchanged():
    folded, report = graphfold.fold(conv_prelu_conv(0.999))
    assert report.calibration is None and report.approximate is None and report.accuracy is None
    assert all(r.exact for r in report.rewrites) and "PRelu" in op_types(folded)
    assert report.to_dict()["approximate"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerance": -1}, "--tolerance"), ({"tolerance": float("nan")}, "--tolerance"),
    ({"snap_slope": 1.5}, "--snap-slope"), ({"epsilon": -1.0}, "--epsilon"),
    ({"drop_branches": -1}, "--drop-branches"), ({"target_depth": 0}, "--target-depth"),
])
def test_bad_options_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        graphfold.fold(conv_prelu_conv(), **kwargs)


def test_tolerance_alone_changes_nothing_and_says_so():
    _, report = graphfold.fold(conv_prelu_conv(0.95), calibration=calibration(), tolerance=0.1)
    assert not approximate(report) and any("--tolerance alone changes nothing" in n for n in report.notes)


# --- ResNet-20-style end to end -------------------------------------------------------------------

def resnet20_style(width: int = 8, size: int = 16, slope: float = 0.999,
                   tiny=((0, 0), (0, 1), (0, 2), (1, 0), (2, 2))) -> onnx.ModelProto:
    """3 stages x 3 basic blocks (widths w, 2w, 4w), PRelu everywhere at ``slope``; the branches of
    the blocks in ``tiny`` scaled to max|F| around 1e-6, the others by 0.5 (what a BatchNorm's gamma
    would do: without it the activations grow stage by stage); GAP + Gemm head."""
    net = Net(3, size)
    x = net.prelu(net.conv("x", "stem", 3, width), "stem.act", slope, width)
    cin = width
    for stage in range(3):
        cout = width << stage
        for index in range(3):
            name, stride = f"s{stage}b{index}", 2 if stage and not index else 1
            scale = 1e-7 if (stage, index) in tiny else 0.5
            h = net.prelu(net.conv(x, f"{name}.c1", cin, cout, stride=stride), f"{name}.act1", slope, cout)
            h = net.conv(h, f"{name}.c2", cout, cout, scale=scale)
            skip = x if stride == 1 and cin == cout else net.conv(x, f"{name}.proj", cin, cout, k=1, stride=stride)
            x = net.prelu(net.op("Add", [skip, h], f"{name}.add"), f"{name}.act2", slope, cout)
            cin = cout
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [x], "gap")], "flat")
    net.op("Gemm", [flat, net.const("fc.w", net.rng.standard_normal((10, cin)) * 0.3),
                    net.const("fc.b", np.zeros(10))], "logits", transB=1)
    return net.model("logits", ["N", 10])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    model = resnet20_style()
    onnx.save(model, path / "resnet.onnx")
    cal = calibration(32, channels=3, size=16)
    np.savez(path / "cal.npz", x=cal["x"], labels=run_ort(model, cal)[0].argmax(axis=1))
    return path, model, cal


def test_resnet20_style_end_to_end_through_the_cli(demo, capsys):
    path, model, cal = demo
    code = cli.main([str(path / "resnet.onnx"), "-o", str(path / "out.onnx"), "--calibration",
                     str(path / "cal.npz"), "--tolerance", "1e-2", "--epsilon", "1e-4", "--snap-slope", "0.99",
                     "--report", str(path / "report.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "approximate folding (--tolerance 0.01" in out and "top-1 accuracy" in out
    folded = onnx.load(str(path / "out.onnx"))
    ops = op_types(folded)
    report = json.loads((path / "report.json").read_text())
    kept = [r for r in report["rewrites"] if not r["exact"]]
    dropped = {r["nodes_removed"][0] for r in kept if r["pass_name"] == "drop-epsilon-branch"}
    assert dropped == {"s0b0.add", "s0b1.add", "s0b2.add", "s1b0.add", "s2b2.add"}
    assert "PRelu" not in ops and ops.count("Add") == 4
    # Stage 1 gone, the stem meets stage 2's projection: an exact merge the removals exposed.
    assert any(r["pass_name"] == "merge-conv-chain" for r in report["rewrites"])
    assert report["after"]["depth"] < report["before"]["depth"]
    assert relative_error(model, folded, cal) <= 1e-2
    assert report["approximate"]["measured_error"] <= 1e-2 and report["validation"]["passed"]
    assert all(r["error_bound"] is not None for r in kept)


def test_resnet20_style_at_a_tight_tolerance_declines_and_says_why(demo, capsys):
    path, model, cal = demo
    folded, report = graphfold.fold(str(path / "resnet.onnx"), calibration=str(path / "cal.npz"), tolerance=1e-6,
                                    epsilon=1e-4, snap_slope=0.99)
    # Each PRelu adds about 1e-3: all declined, and each says by how much. The planted branches
    # together add under 1e-6 (max|F| 1e-6 against activations of order 10), so they still go.
    assert report.counts()["snap-activation"] == 0 and report.counts()["drop-epsilon-branch"] == 5
    removed = {n for r in approximate(report) for n in r.nodes_removed}
    assert op_types(folded).count("PRelu") == sum(1 for n in model.graph.node if n.op_type == "PRelu"
                                                   and n.name not in removed) == 14
    reasons = declines(report, "snap-activation")
    assert reasons and all("> remaining tolerance 1e-06" in r or "> --tolerance 1e-06" in r for r in reasons)
    assert len(reasons) == 14 and relative_error(model, folded, cal) <= 1e-6
    assert "would add error" in report.summary()


def test_resnet20_style_declines_the_branches_too_when_the_tolerance_is_below_their_effect(demo):
    path, model, cal = demo
    folded, report = graphfold.fold(model, calibration=cal, tolerance=1e-8, epsilon=1e-4, snap_slope=0.99)
    assert not approximate(report) and op_types(folded).count("Add") == 9
    assert len(declines(report, "drop-epsilon-branch")) == 9


def test_approximations_are_validated_even_without_check():
    _, report = graphfold.fold(conv_prelu_conv(0.95), calibration=calibration(), tolerance=0.2, snap_slope=0.9,
                               check=False)
    assert report.validation is not None and report.validation.passed


def test_tolerance_zero_declines_border_merges_too():
    _, report = graphfold.fold(conv3_conv3(), calibration=calibration(), allow_border=True)
    assert declines(report, "merge-conv-border") == ["approximate; --tolerance 0 allows exact rewrites only"]


def test_inspect_cli_lists_approximate_rewrites_and_declines(tmp_path, capsys):
    onnx.save(conv_prelu_conv(0.95), tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", **calibration())
    assert cli.main(["inspect", str(tmp_path / "m.onnx"), "--calibration", str(tmp_path / "cal.npz"),
                     "--tolerance", "1e-6", "--snap-slope", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "snap-activation" in out and "would add error" in out


def test_cli_refuses_bad_calibration_with_one_line(tmp_path, capsys):
    onnx.save(conv_prelu_conv(0.95), tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", image=calibration()["x"])
    code = cli.main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--calibration",
                     str(tmp_path / "cal.npz"), "--tolerance", "0.1", "--snap-slope", "0.9"])
    err = capsys.readouterr().err
    assert code == 2 and "no array for graph input 'x' (arrays: image" in err
    assert not (tmp_path / "out.onnx").exists()


def test_torch_demo_tool_end_to_end(tmp_path):
    """tools/make_approx_demo.py (the TorchScript-exported ResNet-20), on 16 samples of 16x16 to stay fast."""
    pytest.importorskip("torch")
    from tools import make_approx_demo

    assert make_approx_demo.main([str(tmp_path), "--samples", "16", "--size", "16"]) == 0
    model_path, cal_path = tmp_path / "resnet20_approx.onnx", tmp_path / "cal.npz"
    folded, report = graphfold.fold(str(model_path), calibration=str(cal_path), tolerance=1e-2, epsilon=1e-4,
                                    snap_slope=0.99)
    assert report.counts()["drop-epsilon-branch"] == len(make_approx_demo.TINY)
    assert "PRelu" not in op_types(folded) and report.counts()["merge-conv-chain"] >= 1
    assert report.accuracy["before"] == 1.0
    with np.load(cal_path) as data:
        assert relative_error(onnx.load(str(model_path)), folded, {"input": data["input"]}) <= 1e-2
