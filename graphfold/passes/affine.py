"""Fold per-channel affine maps into the layer before them (exact).

``BN(conv(x)) = conv'(x)`` with ``W' = W * s``, ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``; likewise a Mul/Add/Sub/Div by a constant that varies only
along the layer's output channels. The layer may be Conv, ConvTranspose, Gemm, or a MatMul
with a constant 2-D weight (a shift turns a rank-2 MatMul into a Gemm). Exact up to float
rounding: the weights are rescaled once instead of the activations every run.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, const_value, detach, float_const, is_shared, make_const, producer, \
    single_use_reason

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def per_channel(value: np.ndarray, out_rank: int, channel_axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a [channels] vector if, broadcast against the layer output, it varies only
    along ``channel_axis`` (and does not grow the output's shape); else None."""
    # Only the channel dim is known here: every other dim of the constant must then be 1.
    layout = [None] * out_rank
    layout[channel_axis] = channels
    if not broadcast_keeps_shape(layout, value.shape):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def layer_reason(ctx: FoldContext, layer: gs.Node | None, out: gs.Tensor) -> str | None:
    """Why an affine map on ``out`` cannot fold into ``layer`` (None if it can)."""
    if layer is None or layer.op not in LAYER_OPS:
        return "input is not produced by Conv, ConvTranspose, Gemm or MatMul"
    reason = single_use_reason(out, ctx.graph_outputs)
    if reason:
        return reason
    weight_tensor = layer.inputs[1]
    if float_const(weight_tensor) is None:
        return f"{layer.op} weight is not a float constant"
    if is_shared(weight_tensor, layer):
        return f"{layer.op} weight is shared with another node"
    weight = float_const(weight_tensor)
    # An invalid model (the checker does not look at weight shapes) is left as it is.
    if layer.op in ("MatMul", "Gemm") and weight.ndim != 2:
        return f"{layer.op} weight is not a 2-D matrix"
    if layer.op in ("Conv", "ConvTranspose") and weight.ndim < 3:
        return f"{layer.op} weight of shape {list(weight.shape)} is not [M, C/g, k...]"
    if layer.op == "Gemm":
        bias = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
        if bias is not None and (float_const(bias) is None or _gemm_bias(layer) is None):
            return "Gemm bias is not a constant vector"
    elif len(layer.inputs) > 2 and layer.inputs[2].name:
        bias = float_const(layer.inputs[2])
        if bias is None:
            return f"{layer.op} bias is not a float constant"
        if layer.op != "MatMul" and bias.shape != (layer_channels(ctx, layer)[2],):
            return f"{layer.op} bias of shape {list(bias.shape)} does not match its output channels"
    return None


def overflow_reason(layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> str | None:
    """Why ``scale * y + shift`` folded into ``layer``'s weights could leave their dtype's range
    or is not finite (None when it fits)."""
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return "the affine map is not finite (a BatchNormalization with var + epsilon <= 0, or inf/NaN)"
    weights = [float_const(t) for t in layer.inputs[1:3] if t.name]
    limit = float(np.finfo(weights[0].dtype).max)
    # max(w) and -min(w), not max|w|: no temporary as large as the weight.
    bound = max(max(float(w.max(initial=0.0)), -float(w.min(initial=0.0))) for w in weights) * \
        float(np.max(np.abs(scale), initial=0.0))
    if bound + float(np.max(np.abs(shift), initial=0.0)) > limit:
        return f"folded weights could overflow {weights[0].dtype}"
    return None


def layer_channels(ctx: FoldContext, layer: gs.Node) -> tuple[int, int, int] | None:
    """(output rank, channel axis, channel count) of a layer's output, if known."""
    weight = float_const(layer.inputs[1])
    if layer.op == "Conv":
        return weight.ndim, 1, weight.shape[0]
    if layer.op == "ConvTranspose":
        return weight.ndim, 1, weight.shape[1] * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm":
        return 2, 1, weight.shape[0] if layer.attrs.get("transB", 0) else weight.shape[1]
    shape = ctx.static_shape(layer.outputs[0])
    if shape is None:
        return None
    return len(shape), len(shape) - 1, weight.shape[1]


def _gemm_bias(layer: gs.Node) -> np.ndarray | None:
    weight = float_const(layer.inputs[1])
    channels = weight.shape[0] if layer.attrs.get("transB", 0) else weight.shape[1]
    if len(layer.inputs) < 3 or not layer.inputs[2].name:
        return np.zeros(channels, weight.dtype)  # the bias is optional
    bias = float_const(layer.inputs[2])
    return None if bias is None else per_channel(bias, 2, 1, channels)


def fold_affine(ctx: FoldContext, layer: gs.Node, scale: np.ndarray, shift: np.ndarray,
                out: gs.Tensor) -> gs.Node:
    """Replace ``layer`` by one that also applies ``scale * y + shift``, writing ``out``."""
    weight = float_const(layer.inputs[1])
    has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
    attrs = dict(layer.attrs)
    op = layer.op
    if op == "Conv":
        bias = float_const(layer.inputs[2]) if has_bias else None
        folded = kernels.affine_after_conv(kernels.ConvParams.create(weight, bias), scale, shift)
        new_weight, new_bias = folded.weight, folded.bias
    elif op == "ConvTranspose":
        bias = float_const(layer.inputs[2]) if has_bias else np.zeros(layer_channels(ctx, layer)[2], weight.dtype)
        new_weight, new_bias = kernels.affine_after_conv_transpose(weight, bias, scale, shift,
                                                                   int(attrs.get("group", 1)))
    else:
        trans_b = bool(attrs.get("transB", 0)) if op == "Gemm" else False
        matrix = weight * attrs.get("alpha", 1.0) if op == "Gemm" else weight
        bias = _gemm_bias(layer) * attrs.get("beta", 1.0) if op == "Gemm" else None
        new_weight, new_bias = kernels.affine_after_gemm(matrix, bias, scale, shift, trans_b)
        if op == "Gemm":
            attrs.update(alpha=1.0, beta=1.0)
        elif np.any(new_bias != 0):
            op, attrs = "Gemm", {}  # a rank-2 MatMul with a bias is a Gemm
        else:
            new_bias = None
    new_weight = new_weight.astype(weight.dtype, copy=False)  # a new array already: no second copy
    inputs = [layer.inputs[0], make_const(ctx.scope, f"{layer.name}.weight", new_weight)]
    if new_bias is not None and (has_bias or np.any(new_bias != 0)):
        inputs.append(make_const(ctx.scope, f"{layer.name}.bias", new_bias.astype(weight.dtype)))
    # The folded layer replaces ``layer`` one for one, so it keeps its name.
    node = gs.Node(op, layer.name or ctx.scope.make(op), attrs=attrs, inputs=inputs, outputs=[out])
    ctx.graph.nodes.append(node)
    return node


def _shift_allowed(ctx: FoldContext, layer: gs.Node, shift: np.ndarray) -> str | None:
    if layer.op == "MatMul" and np.any(shift != 0) and layer_channels(ctx, layer)[0] != 2:
        return "a shift after a MatMul of rank > 2 has no bias to go into"
    return None


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it"

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op == "BatchNormalization" and node.inputs and producer(node.inputs[0]) is not None:
                yield Match((node, producer(node.inputs[0])))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        bn, layer = match.nodes
        if any(t.outputs or t.name in ctx.graph_outputs for t in bn.outputs[1:]):
            return Reject("BatchNormalization in training mode (running statistics are used)")
        if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
            return Reject("BatchNormalization is not in per-channel inference mode")
        params = [float_const(t) for t in bn.inputs[1:5]]
        if len(params) != 4 or any(p is None for p in params):
            return Reject("BatchNormalization parameters are not float constants")
        reason = layer_reason(ctx, layer, bn.inputs[0])
        if reason:
            return Reject(reason)
        channels = layer_channels(ctx, layer)
        if channels is None or channels[1] != 1:
            return Reject("BatchNormalization's channel axis is not the layer's output channel axis")
        if any(p.shape != (channels[2],) for p in params):
            return Reject("BatchNormalization parameters do not match the layer's channel count")
        with np.errstate(all="ignore"):  # a negative var + epsilon is declined, not warned about
            scale, shift = self._affine(bn)
        reason = overflow_reason(layer, scale, shift) or _shift_allowed(ctx, layer, shift)
        return Reject(reason) if reason else Exact()

    @staticmethod
    def _affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (float_const(t).astype(np.float64) for t in bn.inputs[1:5])
        return kernels.bn_scale_shift(gamma, beta, mean, var, float(bn.attrs.get("epsilon", 1e-5)))

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        bn, layer = match.nodes
        scale, shift = self._affine(bn)
        out = bn.outputs[0]
        detach([bn])
        node = fold_affine(ctx, layer, scale, shift, out)
        detach([layer])
        return Change([bn, layer], [node], f"folded {bn.name!r} into {layer.op} {layer.name!r}")


class FoldChannelAffine(Pass):
    name = "fold-affine"
    summary = "fold Mul/Add/Sub/Div by a per-channel constant into the layer before it"

    OPS = ("Mul", "Add", "Sub", "Div")

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op not in self.OPS or len(node.inputs) != 2:
                continue
            for side, tensor in enumerate(node.inputs):
                layer = producer(tensor)
                if layer is not None and layer.op in LAYER_OPS and const_value(node.inputs[1 - side]) is not None:
                    yield Match((node, layer), {"side": side})
                    break

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        node, layer = match.nodes
        reason = layer_reason(ctx, layer, node.inputs[match.data["side"]])
        if reason:
            return Reject(reason)
        affine = self._affine(ctx, match)
        if affine is None:
            return Reject(f"{node.op} constant of shape {list(const_value(node.inputs[1 - match.data['side']]).shape)} "
                          "is not a finite per-output-channel vector of the layer's dtype")
        if node.op == "Div" and match.data["side"] == 1:
            return Reject("constant divided by the layer output is not affine")
        reason = overflow_reason(layer, *affine) or _shift_allowed(ctx, layer, affine[1])
        return Reject(reason) if reason else Exact()

    def _affine(self, ctx: FoldContext, match: Match) -> tuple[np.ndarray, np.ndarray] | None:
        node, layer = match.nodes
        side = match.data["side"]
        value = float_const(node.inputs[1 - side])
        weight = float_const(layer.inputs[1])
        layout = layer_channels(ctx, layer)
        if value is None or layout is None or value.dtype != weight.dtype:
            return None
        vector = per_channel(value.astype(np.float64), *layout)
        if vector is None or not np.all(np.isfinite(vector)) or (node.op == "Div" and np.any(vector == 0)):
            return None
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        if node.op == "Mul":
            return vector, zeros
        if node.op == "Add":
            return ones, vector
        if node.op == "Sub":
            # y - c, or c - y
            return (ones, -vector) if side == 0 else (-ones, vector)
        return 1.0 / vector, zeros

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node, layer = match.nodes
        scale, shift = self._affine(ctx, match)
        out = node.outputs[0]
        detach([node])
        new = fold_affine(ctx, layer, scale, shift, out)
        detach([layer])
        return Change([node, layer], [new], f"folded {node.op} {node.name!r} into {layer.op} {layer.name!r}")
