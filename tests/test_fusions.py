"""The runtime-fusion table: each onnxruntime pattern is recognised as onnxruntime matches it, survives
the default pipeline, and a rewrite that would break it is declined with the pattern's name.
(Latency evidence lives in tools/fusion_benchmark.py and docs/fusions.md, not in timed tests.)"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphfold import fusions
from graphfold.cli import main
from graphfold.engine import Change, Exact, FoldContext, Match, Pass, run_pass
from graphfold.graph import bypass
from graphfold.shapes import infer_static
from tests.passes.test_forward_affine import gelu_tail
from tests.util import Net, assert_same_outputs, fold_only, op_types

C = 6


def found(model) -> list[tuple[str, str, list[str]]]:
    """(pattern, anchor, body) for each instance ``graphfold.fusions`` finds in ``model``."""
    graph = gs.import_onnx(model)
    shapes = infer_static(model)
    ctx = FoldContext(graph, static_shapes=shapes)
    return sorted((f.name, f.anchor.name, [n.name for n in f.body])
                  for f in fusions.find_fusions(graph, ctx.graph_outputs, ctx.static_shape))


def gelu_half_first(n: Net, x: str, out: str) -> str:
    """GELU with the 0.5 applied to x first (gelu_fusion.cc's pattern 1)."""
    d = n.op("Div", [x, n.const(f"{out}.sqrt2", np.float32(math.sqrt(2)))], f"{out}.div")
    e = n.op("Erf", [d], f"{out}.erf")
    a = n.op("Add", [n.const(f"{out}.one", np.float32(1)), e], f"{out}.add")
    h = n.op("Mul", [x, n.const(f"{out}.half", np.float32(0.5))], f"{out}.half_x")
    return n.op("Mul", [h, a], out)


@pytest.mark.parametrize("form", [gelu_tail, gelu_half_first])
def test_gelu_is_found_in_both_export_forms_and_kept(form):
    n = Net([1, C, 8, 8])
    g = form(n, n.conv(n.x, "c", C, C, kernel=1), "g")
    model = n.model(n.conv(g, "y", C, 4, kernel=1))
    assert [name for name, _, _ in found(model)] == ["Gelu"]
    folded, _ = fold_only(model, None)
    assert op_types(folded) == op_types(model)
    assert_same_outputs(model, folded)


def test_gelu_with_another_constant_is_not_gelu():
    n = Net([1, C, 8, 8])
    d = n.op("Div", [n.x, n.const("k", np.float32(1.5))], "d")
    e = n.op("Erf", [d], "e")
    a = n.op("Add", [e, n.const("one", np.float32(1))], "a")
    m = n.op("Mul", [n.x, a], "m")
    h = n.op("Mul", [m, n.const("half", np.float32(0.5))], "h")
    model = n.model(n.conv(h, "y", C, 4, kernel=1))
    assert found(model) == []
    # Not onnxruntime's Gelu, so nothing protects the final Mul: it folds forward.
    folded, _ = fold_only(model, ["fold-affine-forward"])
    assert op_types(folded).count("Mul") == 1


@pytest.mark.parametrize("act,extra", [("Relu", {}), ("Sigmoid", {}), ("HardSigmoid", {}), ("LeakyRelu", {}),
                                       ("Clip", {"bounds": True})])
def test_conv_activation_is_found(act, extra):
    n = Net([1, C, 8, 8])
    c = n.conv(n.x, "c", C, C, kernel=3, pads=[1, 1, 1, 1])
    inputs = [c] + ([n.const("lo", np.float32(0)), n.const("hi", np.float32(6))] if extra else [])
    model = n.model(n.op(act, inputs, "a"))
    assert found(model) == [(f"Conv+{act}", "c", ["a"])]


def test_conv_clip_with_run_time_bounds_is_not_fused():
    n = Net([1, C, 8, 8])
    c = n.conv(n.x, "c", C, C, kernel=1)
    model = n.model(n.op("Clip", [c, n.input("lo", []), n.input("hi", [])], "a"))
    assert found(model) == []


def residual(n: Net, bias: bool = True, act: str | None = "Relu") -> str:
    """Conv(x) + Sigmoid(x): a skip graphfold cannot fold into the kernel, as in a real block."""
    skip = n.op("Sigmoid", [n.x], "skip")
    c = n.conv(n.x, "c", C, C, kernel=3, pads=[1, 1, 1, 1], bias=bias)
    s = n.op("Add", [c, skip], "s")
    return n.op(act, [s], "r") if act else s


@pytest.mark.parametrize("act", ["Relu", None])
def test_conv_add_activation_is_found_and_kept(act):
    n = Net([1, C, 8, 8])
    model = n.model(residual(n, act=act))
    name = "Conv+Add+Relu" if act else "Conv+Add"
    assert found(model) == [(name, "c", ["s", "r"] if act else ["s"])]
    folded, _ = fold_only(model, None)
    assert op_types(folded) == op_types(model)


def test_identity_skip_folded_into_the_kernel_beats_conv_add():
    """x + conv(x) -> conv': the Add is gone, not moved, so its fusion is not a reason to keep it."""
    n = Net([1, C, 8, 8])
    c = n.conv(n.x, "c", C, C, kernel=3, pads=[1, 1, 1, 1])
    model = n.model(n.op("Relu", [n.op("Add", [c, n.x], "s")], "r"))
    folded, _ = fold_only(model, None)
    assert op_types(folded) == ["Conv", "Relu"]
    assert_same_outputs(model, folded)


def test_conv_add_without_bias_is_not_fused():
    """onnxruntime's ConvAddActivationFusion skips a Conv without bias."""
    n = Net([1, C, 8, 8])
    model = n.model(residual(n, bias=False, act=None))
    assert found(model) == []


def test_matmul_add_is_found():
    n = Net([3, 5])
    h = n.op("MatMul", [n.x, n.random("w", [5, 4])], "h")
    model = n.model(n.op("Add", [h, n.random("b", [4])], "y"))
    assert found(model) == [("MatMul+Add", "h", ["y"])]


def test_hardswish_forms_are_not_runtime_fusions():
    """Measured (docs/fusions.md): onnxruntime fuses neither form on CPU, so folding next to them is free."""
    n = Net([1, C, 8, 8])
    a = n.op("Add", [n.x, n.const("three", np.float32(3))], "a")
    c = n.op("Clip", [a, n.const("lo", np.float32(0)), n.const("hi", np.float32(6))], "c6")
    m = n.op("Mul", [n.x, c], "m")
    d = n.op("Div", [m, n.const("six", np.float32(6))], "d")
    hs = n.op("HardSigmoid", [d], "hs", alpha=1 / 6)
    model = n.model(n.op("Mul", [d, hs], "y"))
    assert found(model) == []


class RemoveNode(Pass):
    """A test pass that bypasses one named single-input-like node (moving its work nowhere)."""

    name = "remove-node"

    def __init__(self, target: str) -> None:
        self.target = target

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.name == self.target:
                yield Match((node,))

    def check(self, ctx: FoldContext, match: Match):
        return Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision) -> Change:
        node = match.anchor
        bypass(node, node.inputs[0], node.outputs[0], ctx.graph_outputs)
        return Change([node], [])


def test_engine_declines_any_pass_that_would_break_a_fusion():
    n = Net([1, C, 8, 8])
    model = n.model(residual(n))
    graph = gs.import_onnx(model)
    ctx = FoldContext(graph, static_shapes=infer_static(model))
    assert run_pass(ctx, RemoveNode("r")) == []
    assert ctx.declines[0].reason.startswith("keeps onnxruntime's Conv+Add+Relu fusion around Conv 'c'")


def test_engine_lets_a_pass_rebuild_the_anchor_with_its_body():
    n = Net([3, 5])
    h = n.op("MatMul", [n.x, n.random("w", [5, 4])], "h")
    model = n.model(n.op("Add", [h, n.random("b", [4])], "y"))
    folded, report = fold_only(model, ["fold-affine"])
    assert op_types(folded) == ["Gemm"] and len(report.rewrites) == 1


def test_inspect_names_the_pattern(tmp_path, capsys):
    n = Net([1, C, 8, 8])
    g = gelu_tail(n, n.x, "g")
    path = tmp_path / "gelu.onnx"
    onnx.save(n.model(n.conv(g, "y", C, 4, kernel=1)), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "keeps onnxruntime's Gelu fusion" in capsys.readouterr().out


@pytest.mark.parametrize("form,member", [(gelu_tail, name) for name in ("g.div", "g.erf", "g.add", "g.mul", "g")] +
                         [(gelu_half_first, name) for name in ("g.div", "g.erf", "g.add", "g.half_x", "g")])
def test_engine_finds_the_gelu_from_any_of_its_nodes(form, member):
    n = Net([1, C, 8, 8])
    model = n.model(n.conv(form(n, n.x, "g"), "y", C, 4, kernel=1))
    graph = gs.import_onnx(model)
    ctx = FoldContext(graph, static_shapes=infer_static(model))
    assert run_pass(ctx, RemoveNode(member)) == []
    assert "Gelu fusion around Div 'g.div'" in ctx.declines[0].reason
