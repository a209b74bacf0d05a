"""Gather constant-map Adds: sink them through linear Convs and combine them.

An exact merge of a pointwise conv with bias into a padded kxk leaves an ``Add(C)`` of a
constant map (the border correction), which onnxruntime cannot fuse into its conv layout.
Since a Conv is affine with zero padding, ``conv(v + C) = conv(v) + conv0(C)`` where ``conv0``
is the conv without bias applied to C broadcast to v's shape; and ``(v + C1) + C2 = v + (C1 +
C2)``. Sinking each map through the Convs after it until it meets the next map turns one Add
per merged block into one Add per linear stretch of the network. Exact up to float rounding.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, const_value, conv_params, detach, make_const, make_var, \
    sole_consumer

# Maps larger than this are not propagated: the constant would bloat the model.
MAX_MAP_ELEMENTS = 1 << 22


def _constant_add(node: gs.Node | None) -> tuple[gs.Tensor, np.ndarray] | None:
    """(variable operand, constant) of an Add with exactly one constant operand."""
    if node is None or node.op != "Add" or len(node.inputs) != 2:
        return None
    values = [const_value(t) for t in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None
    side = 0 if values[0] is None else 1
    return node.inputs[side], values[1 - side]


class SinkConstantAdds(Pass):
    name = "sink-constant-adds"
    summary = "move constant-map Adds (border corrections) through linear Convs and combine them"

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            found = _constant_add(node)
            if found is None or np.ndim(found[1]) < 2:
                continue  # scalars and per-channel vectors are fold-affine's business
            consumer = sole_consumer(node.outputs[0], ctx.graph_outputs)
            if consumer is None:
                continue
            if _constant_add(consumer) is not None:
                yield Match((node, consumer), {"kind": "combine"})
            elif consumer.op == "Conv" and consumer.inputs[0] is node.outputs[0]:
                after = sole_consumer(consumer.outputs[0], ctx.graph_outputs)
                # Sinking pays only when the map then meets another one to combine with.
                if _constant_add(after) is not None:
                    yield Match((node, consumer), {"kind": "sink"})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        add, consumer = match.nodes
        v, value = _constant_add(add)
        shape = ctx.static_shape(v)
        if not broadcast_keeps_shape(shape, value.shape):
            return Reject("the constant could broadcast the tensor to a larger shape (or its static shape is unknown)")
        if match.data["kind"] == "combine":
            other = _constant_add(consumer)[1]
            if not broadcast_keeps_shape(shape, other.shape) or other.dtype != value.dtype:
                return Reject("the second constant could change the tensor's shape or dtype")
            return Exact()
        if any(d is None for d in shape[1:]):
            return Reject("the tensor's channel and spatial dims are not static, so the moved map cannot be built")
        params = conv_params(consumer, shape[2:])
        if params is None:
            return Reject(f"Conv {consumer.name!r} weights are not float constants")
        if value.dtype != params.weight.dtype:
            return Reject("constant and weights have different dtypes")
        out_shape = ctx.static_shape(consumer.outputs[0])
        if out_shape is None or _map_batch(shape, value) * np.prod([d or 1 for d in out_shape[1:]]) > MAX_MAP_ELEMENTS:
            return Reject("the conv's output map is too large or of unknown shape")
        return Exact(plan=params)

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        add, consumer = match.nodes
        v, value = _constant_add(add)
        if match.data["kind"] == "combine":
            w, other = _constant_add(consumer)
            out = consumer.outputs[0]
            detach([add, consumer])
            total = (value.astype(np.float64) + other.astype(np.float64)).astype(value.dtype)
            node = gs.Node("Add", ctx.scope.make(f"{consumer.name}_combined"),
                           inputs=[v, make_const(ctx.scope, f"{consumer.name}.map", total)], outputs=[out])
            ctx.graph.nodes.append(node)
            return Change([add, consumer], [node], "combined two constant-map Adds")
        params: kernels.ConvParams = decision.plan
        shape = ctx.static_shape(v)
        # A map with a batch dim (equal to the tensor's static batch) stays one map per sample.
        full = np.broadcast_to(value, (_map_batch(shape, value), *shape[1:]))
        linear = kernels.ConvParams(params.weight, np.zeros_like(params.bias), params.strides, params.dilations,
                                    params.pads, params.group)
        moved = kernels.conv_reference(full.astype(np.float64), linear).astype(value.dtype)
        out = consumer.outputs[0]
        inner = make_var(ctx.scope, f"{consumer.name}.out", like=out)
        ctx.copy_shape(inner, out)
        conv = gs.Node("Conv", consumer.name, attrs=dict(consumer.attrs),
                       inputs=[v] + list(consumer.inputs[1:]), outputs=[inner])
        sunk = gs.Node("Add", ctx.scope.make(f"{add.name}_sunk"),
                       inputs=[inner, make_const(ctx.scope, f"{add.name}.map", moved)], outputs=[out])
        detach([add, consumer])
        ctx.graph.nodes.extend([conv, sunk])
        return Change([add, consumer], [conv, sunk], f"moved a constant map through Conv {consumer.name!r}")


def _map_batch(shape: tuple, value: np.ndarray) -> int:
    """The batch size of ``value`` broadcast against a tensor of ``shape`` (1 unless it has one)."""
    return int(value.shape[0]) if value.ndim == len(shape) else 1
