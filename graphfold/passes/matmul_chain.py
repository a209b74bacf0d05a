"""Merge chains of MatMul/Gemm layers with constant 2-D weights into one layer.

``(x @ W1 + b1) @ W2 + b2 = x @ (W1 @ W2) + (b1 @ W2 + b2)`` (``kernels.compose_matmul``). A layer
is a Gemm ``alpha * x @ op(B) + beta * C`` (transB and alpha/beta folded into the matrix and bias;
transA declined), or a MatMul ``x @ W`` of any input rank with a 2-D W, together with an Add of a
constant bias over its last axis when one follows. Exact in real arithmetic; in floats the
product W1 @ W2 is formed once, in float64, so the result rounds differently from the chain.

A chain is a maximal run of such layers whose intermediates have one consumer. The pass picks the
split into merged segments with the fewest multiply-accumulates per row (K * N per layer; a tie
goes to fewer layers), so a merge happens only where MACs do not grow (K*N2 <= K*N1 + N1*N2 for
two layers); with ``--fold-all``, the fewest layers. A merged segment is a Gemm when its input is
2-D and it has a bias, else a MatMul, followed by an Add of the bias if it has one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, const_value, detach, float_const, is_shared, make_const, make_var, \
    single_use_reason, sole_consumer


@dataclass
class Layer:
    """``x -> MatMul/Gemm (-> bias Add) -> out``: the nodes, in order, with the layer's ends."""

    nodes: tuple[gs.Node, ...]
    x: gs.Tensor
    out: gs.Tensor

    @property
    def node(self) -> gs.Node:
        return self.nodes[0]

    def weight(self) -> np.ndarray:
        """The [K, N] matrix, transB and alpha folded in (float64)."""
        node = self.node
        weight = float_const(node.inputs[1]).astype(np.float64)
        if node.op == "Gemm":
            weight = weight.T if node.attrs.get("transB", 0) else weight
            weight = weight * float(node.attrs.get("alpha", 1.0))
        return weight

    def bias(self) -> np.ndarray | None:
        """The bias (float64) broadcast over the output rows, or None."""
        node = self.node
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            return float_const(node.inputs[2]).astype(np.float64) * float(node.attrs.get("beta", 1.0))
        if len(self.nodes) > 1:
            add = self.nodes[1]
            value = const_value(add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0])
            return value.astype(np.float64).reshape(-1)
        return None


def _bias_add(ctx: FoldContext, node: gs.Node, columns: int) -> gs.Node | None:
    """The Add of a constant [N] bias (or a scalar) that alone reads a MatMul's output, if any."""
    add = sole_consumer(node.outputs[0], ctx.graph_outputs)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    value = float_const(other)
    out_shape = ctx.static_shape(node.outputs[0])
    # A bias of more dims than the output, or varying along rows, would change the result's shape
    # or be no bias at all; such an Add stays after the merged layer.
    rank = len(out_shape) if out_shape is not None else 1
    if value is None or not broadcast_keeps_shape([None] * (rank - 1) + [columns], value.shape):
        return None
    return add


def _layer(ctx: FoldContext, node: gs.Node) -> Layer | None:
    """``node`` as the head of a layer: a MatMul/Gemm of a run-time input by a constant."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    if const_value(node.inputs[1]) is None or const_value(node.inputs[0]) is not None:
        return None
    weight = const_value(node.inputs[1])
    add = _bias_add(ctx, node, weight.shape[-1]) if node.op == "MatMul" and weight.ndim else None
    nodes = (node, add) if add is not None else (node,)
    return Layer(nodes, node.inputs[0], nodes[-1].outputs[0])


def layer_reason(layer: Layer) -> str | None:
    """Why a layer cannot take part in a merge (None if it can)."""
    node = layer.node
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return f"Gemm {node.name!r} has transA=1 (its input is transposed)"
    weight = float_const(node.inputs[1])
    if weight is None:
        return f"{node.op} {node.name!r} weight is not a float constant"
    if weight.ndim != 2:
        return f"{node.op} {node.name!r} weight is not a 2-D matrix (shape {list(weight.shape)})"
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name and float_const(node.inputs[2]) is None:
        return f"Gemm {node.name!r} bias is not a float constant"
    if is_shared(node.inputs[1], node):
        return f"{node.op} {node.name!r} weight is shared with another node"
    return None


def _size(layer: Layer) -> tuple[int, int]:
    """(K, N) of the layer's matrix."""
    rows, cols = float_const(layer.node.inputs[1]).shape
    return (cols, rows) if layer.node.op == "Gemm" and layer.node.attrs.get("transB", 0) else (rows, cols)


def _runs(reasons: list[str | None]) -> list[tuple[int, int]]:
    """Maximal index ranges [start, stop) of layers with no reason against them."""
    runs, start = [], None
    for index, reason in enumerate([*reasons, "end"]):
        if reason is None and start is None:
            start = index
        elif reason is not None and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _best_split(sizes: list[tuple[int, int]], runs: list[tuple[int, int]],
                fold_all: bool) -> list[tuple[int, int]]:
    """Segments (start, stop) covering each run with the fewest MACs per row (fold_all: fewest layers)."""
    segments = []
    for first, last in runs:
        best: dict[int, tuple] = {first: (0, 0, [])}
        for stop in range(first + 1, last + 1):
            options = []
            for start in range(first, stop):
                macs = sizes[start][0] * sizes[stop - 1][1]
                total, count, segs = best[start]
                options.append((total + macs, count + 1, segs + [(start, stop)]))
            best[stop] = min(options, key=lambda o: (o[1], o[0]) if fold_all else (o[0], o[1]))
        segments.extend(best[last][2])
    return segments


def _compose(segment: list[Layer]) -> tuple[np.ndarray, np.ndarray | None]:
    """The one layer equal to ``segment``: its weight and bias (None when no layer has one), in
    the model's dtype (NotMergeable when they do not fit it)."""
    weight, bias = segment[0].weight(), segment[0].bias()
    for layer in segment[1:]:
        weight, bias = kernels.compose_matmul(weight, bias, layer.weight(), layer.bias())
    dtype = float_const(segment[0].node.inputs[1]).dtype
    return kernels.narrow(weight, dtype), None if bias is None else kernels.narrow(bias, dtype)


class MergeMatMulChains(Pass):
    name = "merge-matmul-chain"
    summary = "merge chains of MatMul/Gemm layers with constant 2-D weights into one layer"

    def match(self, ctx: FoldContext):
        layers = {id(n): layer for n in ctx.graph.nodes if (layer := _layer(ctx, n)) is not None}
        followers = {}
        for key, layer in layers.items():
            nxt = sole_consumer(layer.out, ctx.graph_outputs)
            if nxt is not None and id(nxt) in layers and nxt.inputs[0] is layer.out:
                followers[key] = layers[id(nxt)]
        starts = set(layers) - {id(layer.node) for layer in followers.values()}
        for key, layer in layers.items():
            if key in starts and key in followers:
                chain = [layer]
                while id(chain[-1].node) in followers:
                    chain.append(followers[id(chain[-1].node)])
                yield Match(tuple(n for layer in chain for n in layer.nodes), {"layers": chain})
            elif key not in followers:
                # A link that must keep its intermediate: declined, so inspect says why.
                reason = single_use_reason(layer.out, ctx.graph_outputs)
                nxt = next((n for n in layer.out.outputs if id(n) in layers and n.inputs[0] is layer.out), None)
                if reason and nxt is not None:
                    yield Match((*layer.nodes, nxt), {"blocked": reason})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        if "blocked" in match.data:
            return Reject(match.data["blocked"])
        layers: list[Layer] = match.data["layers"]
        reasons = [layer_reason(layer) for layer in layers]
        sizes = [_size(layer) if reason is None else (0, 0) for layer, reason in zip(layers, reasons)]
        segments = _best_split(sizes, _runs(reasons), ctx.options.fold_all)
        merged = [seg for seg in segments if seg[1] - seg[0] > 1]
        if merged:
            try:
                # Composed here, not in rewrite, so a product that does not fit the dtype declines.
                plan = [(start, stop, _compose(layers[start:stop])) for start, stop in merged]
            except kernels.NotMergeable as exc:
                return Reject(str(exc))
            return Exact(plan=plan)
        first = next((reason for reason in reasons if reason), None)
        if first:
            return Reject(first)
        before, after = sum(k * n for k, n in sizes), sizes[0][0] * sizes[-1][1]
        return Reject(f"merging does not pay ({before} -> {after} MACs per row); --fold-all merges anyway")

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        layers: list[Layer] = match.data["layers"]
        removed, added, parts = [], [], []
        for start, stop, (weight, bias) in decision.plan:
            segment = layers[start:stop]
            nodes = [n for layer in segment for n in layer.nodes]
            detach(nodes)
            new = self._emit(ctx, segment, weight, bias)
            ctx.graph.nodes.extend(new)
            removed.extend(nodes)
            added.extend(new)
            parts.append(f"{len(segment)} layers -> {' + '.join(n.op for n in new)} "
                         f"{weight.shape[0]}x{weight.shape[1]}")
        return Change(removed, added, "; ".join(parts))

    @staticmethod
    def _emit(ctx: FoldContext, segment: list[Layer], weight: np.ndarray, bias: np.ndarray | None) -> list[gs.Node]:
        x, out = segment[0].x, segment[-1].out
        name = segment[0].node.name or segment[0].node.op
        w = make_const(ctx.scope, f"{name}.weight", weight)
        if bias is None or not np.any(bias):
            return [gs.Node("MatMul", ctx.scope.make(f"{name}_merged"), inputs=[x, w], outputs=[out])]
        b = make_const(ctx.scope, f"{name}.bias", bias)
        shape = ctx.static_shape(x)
        # Gemm takes only 2-D inputs; a Gemm in the segment proves its input is 2-D.
        if (shape is not None and len(shape) == 2) or any(layer.node.op == "Gemm" for layer in segment):
            return [gs.Node("Gemm", ctx.scope.make(f"{name}_merged"), inputs=[x, w, b], outputs=[out])]
        product = make_var(ctx.scope, f"{name}.product", like=out)
        ctx.copy_shape(product, out)
        return [gs.Node("MatMul", ctx.scope.make(f"{name}_merged"), inputs=[x, w], outputs=[product]),
                gs.Node("Add", ctx.scope.make(f"{name}_bias"), inputs=[product, b], outputs=[out])]
