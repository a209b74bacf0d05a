"""Fold a per-channel scale or shift into the layers that read it (exact).

``conv(s[c]*x + t[c]) = conv'(x)``: the scale goes into the conv's input-channel weights, exact
for any padding (a scaled zero is still zero); the shift goes into its bias (``b += sum over taps
of W*t``), exact only when the conv is unpadded, because a padded conv reads zeros, not ``t``, at
its border. Likewise ``(s*x + t) @ B = x @ (diag(s) B) + t @ B`` for Gemm and MatMul readers (a
shift turns a rank-2 MatMul into a Gemm). The map is a Mul or Div by a constant, or an Add or Sub
of one, that varies only along the readers' input channels.

This is the other direction of ``fold-affine``, for maps whose producer cannot take them: a
hand-built HardSwish ``x * Relu6(x + 3) / 6`` ends in a Div before a conv, PP-LCNetV3 puts a
learnable scale and shift (Mul, Add) before its 1x1 convs. Every reader of the tensor takes the
map, or none does. A shift into a padded conv would need a constant border map after it (an Add
onnxruntime cannot fuse into the conv), which costs more than the Add it replaces: declined.
When a scale is followed by such a shift, the scale alone moves past it (``s*x + t =
s*(x + t/s)``) into the padded reader, leaving one Add. GELU's final ``* 0.5`` stays where it
is (the engine's runtime-fusion table says why).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, conv_params, detach, float_const, make_const
from graphfold.passes.affine import per_channel

AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
READER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Folded:
    """A reader rebuilt with the map inside it."""

    op: str
    attrs: dict
    weight: np.ndarray
    bias: np.ndarray | None


def affine_of(op: str, value: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), in ``value``'s broadcast shape, of ``op`` with the variable at input ``side``."""
    ones, zeros = np.ones_like(value), np.zeros_like(value)
    if op == "Mul":
        return value, zeros
    if op == "Div":
        return 1.0 / value, zeros
    if op == "Add":
        return ones, value
    return (ones, -value) if side == 0 else (-ones, value)  # x - c, or c - x


def node_affine(node: gs.Node, side: int) -> tuple[np.ndarray, np.ndarray]:
    """``affine_of`` an affine node, in float64 so the map is rounded once, into the weights (ONNX
    types the constant, the data and the reader's weights alike: the model's dtype is kept)."""
    return affine_of(node.op, float_const(node.inputs[1 - side]).astype(np.float64), side)


def _layout(ctx: FoldContext, reader: gs.Node, weight: np.ndarray, x: gs.Tensor) -> tuple[int, int, int] | str:
    """(rank, channel axis, channel count) of the reader's data input, or why it is unknown."""
    if reader.op == "Conv":
        return weight.ndim, 1, weight.shape[1] * int(reader.attrs.get("group", 1))
    if reader.op == "Gemm":
        channels = weight.shape[1] if reader.attrs.get("transB", 0) else weight.shape[0]
        return 2, 0 if reader.attrs.get("transA", 0) else 1, channels
    shape = ctx.static_shape(x)
    if shape is None:
        return f"the rank of MatMul {reader.name!r}'s input is unknown"
    return len(shape), len(shape) - 1, weight.shape[0]


def _weight_reason(reader: gs.Node, y: gs.Tensor) -> str | None:
    if not reader.inputs or reader.inputs[0] is not y or any(t is y for t in reader.inputs[1:]):
        return f"{reader.op} {reader.name!r} reads {y.name!r} as a weight, not as its data input"
    weight = float_const(reader.inputs[1]) if len(reader.inputs) > 1 else None
    if weight is None:
        return f"{reader.op} {reader.name!r} weight is not a float constant"
    if reader.op in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"{reader.op} {reader.name!r} weight is not a 2-D matrix"
    if len(reader.inputs) > 2 and reader.inputs[2].name and float_const(reader.inputs[2]) is None:
        return f"{reader.op} {reader.name!r} bias is not a float constant"
    return None


def fold_into_reader(ctx: FoldContext, reader: gs.Node, x: gs.Tensor, scale: np.ndarray,
                     shift: np.ndarray) -> Folded | str:
    """``reader`` rebuilt to read ``x`` instead of ``scale*x + shift``, or why it cannot be
    (``_weight_reason`` first)."""
    weight = float_const(reader.inputs[1])
    layout = _layout(ctx, reader, weight, x)
    if isinstance(layout, str):
        return layout
    x_shape = ctx.static_shape(x)
    vectors = [per_channel(v, *layout) for v in (scale, shift)]
    if not all(broadcast_keeps_shape(x_shape, v.shape) for v in (scale, shift)) or any(v is None for v in vectors):
        return (f"constant of shape {list(scale.shape)} is not a per-channel vector over "
                f"{reader.op} {reader.name!r}'s {layout[2]} input channels")
    scale_vec, shift_vec = vectors
    if not (np.all(np.isfinite(scale_vec)) and np.all(np.isfinite(shift_vec))):
        return "the map is not finite (a division by zero, or inf/NaN)"
    try:
        if reader.op == "Conv":
            return _fold_conv(ctx, reader, x, scale_vec, shift_vec)
        return _fold_matrix(reader, layout[0], weight, scale_vec, shift_vec)
    except kernels.NotMergeable as exc:
        return f"{reader.op} {reader.name!r}: {exc}"


def _fold_conv(ctx: FoldContext, reader: gs.Node, x: gs.Tensor, scale: np.ndarray,
               shift: np.ndarray) -> Folded | str:
    params = conv_params(reader, ctx.static_spatial(x))
    has_shift = bool(np.any(shift))
    if params is None:
        if has_shift:
            return f"Conv {reader.name!r} pads automatically and the input size is unknown"
        # A scale alone needs no pads: give the weights with any geometry.
        bias = float_const(reader.inputs[2]) if len(reader.inputs) > 2 and reader.inputs[2].name else None
        params = kernels.ConvParams.create(float_const(reader.inputs[1]), bias,
                                           group=int(reader.attrs.get("group", 1)))
    if has_shift and any(params.pads):
        return (f"Conv {reader.name!r} is padded: a shift would leak into its zero border; folding it "
                "needs a constant border map after the conv, an Add that costs more than it saves")
    folded = kernels.affine_before_conv(params, scale, shift)
    has_bias = len(reader.inputs) > 2 and reader.inputs[2].name
    bias = folded.bias if has_bias or np.any(folded.bias) else None
    return Folded("Conv", dict(reader.attrs), folded.weight, bias)


def _fold_matrix(reader: gs.Node, rank: int, weight: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray) -> Folded | str:
    attrs = dict(reader.attrs)
    bias = float_const(reader.inputs[2]) if len(reader.inputs) > 2 and reader.inputs[2].name else None
    if reader.op == "MatMul" and np.any(shift) and rank != 2:
        return f"a shift before MatMul {reader.name!r} of rank {rank} has no bias to go into"
    if reader.op == "Gemm":
        # alpha and beta folded into B and C, so the kernel sees a plain x @ B + C.
        weight = weight * np.asarray(attrs.get("alpha", 1.0), weight.dtype)
        bias = None if bias is None else bias * np.asarray(attrs.get("beta", 1.0), bias.dtype)
        attrs.update(alpha=1.0, beta=1.0)
    new_weight, new_bias = kernels.affine_before_gemm(weight, bias, scale, shift,
                                                      bool(attrs.get("transB", 0)))
    op = "Gemm" if reader.op == "Gemm" or new_bias is not None else "MatMul"
    return Folded(op, attrs if reader.op == "Gemm" else {}, new_weight, new_bias)


class FoldAffineForward(Pass):
    name = "fold-affine-forward"
    summary = "fold Mul/Div/Add/Sub by a per-channel constant into the Conv/Gemm/MatMul layers reading it"

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            side = affine_side(node)
            if side is None:
                continue
            readers = node.outputs[0].outputs
            # Only maps some layer reads are candidates, so ``inspect`` lists declines worth reading.
            if any(reader.op in READER_OPS for reader in readers):
                yield Match((node, *readers), {"side": side})
            elif node.op in ("Mul", "Div") and len(readers) == 1 and readers[0].op in ("Add", "Sub"):
                # scale then shift (PP-LCNetV3): s*x + t = s*(x + t/s) takes the scale past the shift
                # into readers the shift alone cannot enter (padded ones).
                shift, shift_side = readers[0], affine_side(readers[0])
                if shift_side is not None and any(r.op in READER_OPS for r in shift.outputs[0].outputs):
                    yield Match((node, shift, *shift.outputs[0].outputs),
                                {"side": side, "shift": shift, "shift_side": shift_side})

    def moved_nodes(self, match: Match) -> tuple:
        return (match.anchor,)  # the readers are rebuilt as the same layers, writing the same tensors

    def _plans(self, ctx: FoldContext, match: Match) -> tuple[list[Folded], np.ndarray | None] | str:
        """How each reader is rebuilt, and the constant of the Add left in front of them (when the
        scale moves past a shift), or why the map cannot fold."""
        node, side = match.anchor, match.data["side"]
        x, last = node.inputs[side], match.data.get("shift", node)
        y = last.outputs[0]
        for tensor in {node.outputs[0].name: node.outputs[0], y.name: y}.values():
            if tensor.name in ctx.graph_outputs:
                return f"{tensor.name!r} is a graph output or read by a subgraph"
        readers = list(y.outputs)
        for reader in readers:
            if reader.op not in READER_OPS:
                return (f"{y.name!r} is also read by {reader.op} {reader.name!r}, which cannot take the map "
                        "(every reader takes it, or none)")
            reason = _weight_reason(reader, y)
            if reason:
                return reason
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            scale, shift = node_affine(node, side)
            remainder = None
            if last is not node:
                outer, offset = node_affine(last, match.data["shift_side"])
                scale, remainder = outer * scale, offset / (outer * scale)
                if not np.all(np.isfinite(remainder)) or \
                        not broadcast_keeps_shape(ctx.static_shape(x), remainder.shape):
                    return "the scale cannot move past the shift (a zero scale, or a shift of another shape)"
                shift = np.zeros_like(scale)
        plans = []
        for reader in readers:
            plan = fold_into_reader(ctx, reader, x, scale, shift)
            if isinstance(plan, str):
                return plan
            plans.append(plan)
        if remainder is not None:
            try:
                remainder = kernels.narrow(remainder, plans[0].weight.dtype)
            except kernels.NotMergeable as exc:
                return f"the shift left in front: {exc}"
        return plans, remainder

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        plans = self._plans(ctx, match)
        return Reject(plans) if isinstance(plans, str) else Exact(plan=plans)

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node, side = match.anchor, match.data["side"]
        last = match.data.get("shift", node)
        x, y = node.inputs[side], last.outputs[0]
        readers = list(y.outputs)
        plans, remainder = decision.plan
        added = []
        detach([node, last] if last is not node else [node])
        if remainder is not None:
            # x + t/s, written to the tensor the readers read: only the scale moved.
            const = make_const(ctx.scope, f"{last.name}.shift", remainder)
            added.append(gs.Node("Add", last.name or ctx.scope.make("Add"), inputs=[x, const], outputs=[y]))
            ctx.graph.nodes.append(added[-1])
            source = y
        else:
            source = x
        for reader, plan in zip(readers, plans):
            inputs = [source, make_const(ctx.scope, f"{reader.name}.weight", plan.weight)]
            if plan.bias is not None:
                inputs.append(make_const(ctx.scope, f"{reader.name}.bias", plan.bias))
            outputs = list(reader.outputs)
            detach([reader])
            # The rebuilt layer replaces ``reader`` one for one, so it keeps its name.
            new = gs.Node(plan.op, reader.name or ctx.scope.make(plan.op), attrs=plan.attrs,
                          inputs=inputs, outputs=outputs)
            ctx.graph.nodes.append(new)
            added.append(new)
        names = ", ".join(repr(r.name) for r in readers)
        moved = f"{node.op} {node.name!r}" + (f" past {last.op} {last.name!r}" if last is not node else "")
        removed = [node, last, *readers] if last is not node else [node, *readers]
        return Change(removed, added, f"folded {moved} forward into {names}")


def affine_side(node: gs.Node) -> int | None:
    """The input index of the variable when ``node`` is Mul/Div/Add/Sub by one float constant."""
    if node.op not in AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    constant = [float_const(t) is not None for t in node.inputs]
    if constant.count(True) != 1:
        return None
    side = constant.index(False)
    if node.op == "Div" and side == 1:
        return None  # c / x is not affine in x
    # A constant varying along two axes is a map (a border correction): sink-constant-adds' business.
    return None if sum(d > 1 for d in float_const(node.inputs[1 - side]).shape) > 1 else side
