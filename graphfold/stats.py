"""Model statistics for reports: nodes, convs, depth, parameters and MACs.

Depth is the longest chain of compute layers (Conv, ConvTranspose, Gemm, MatMul and
their quantized forms) along any path of the graph: the number of layers a signal
crosses in sequence, which is what depth folding reduces. Every count goes through
If/Loop/Scan bodies: of an If's two branches only one runs, so the larger counts; a
Loop's or Scan's body counts once.
"""
from __future__ import annotations

import math
from typing import Callable, Collection, Iterator, Mapping

import onnx

Shape = tuple

CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
LAYER_OPS = CONV_OPS | {"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger"}


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every If/Loop/Scan body inside it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def nested(node: onnx.NodeProto, measure: Callable[[onnx.GraphProto], int | None]) -> int | None:
    """``measure`` of the graphs inside ``node``: the larger of an If's branches (only one runs),
    a Loop's or Scan's body once (one iteration: the trip count is a run-time value), the sum for
    any other op carrying graphs; 0 without graphs, None when a measure is unknown."""
    bodies = [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
    bodies += [g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPHS for g in attr.graphs]
    if not bodies:
        return 0
    values = [measure(body) for body in bodies]
    if any(v is None for v in values):
        return None
    return max(values) if node.op_type == "If" else sum(values)


def node_count(graph: onnx.GraphProto, ops: Collection[str] | None = None) -> int:
    """Nodes (of ``ops`` only, if given), through If/Loop/Scan bodies as ``nested`` counts them."""
    return sum(int(ops is None or node.op_type in ops) + nested(node, lambda g: node_count(g, ops))
               for node in graph.node)


def depth(graph: onnx.GraphProto) -> int:
    """Longest chain of ``LAYER_OPS`` nodes through the graph (nodes in any order); a node with
    bodies adds their depth (the deeper If branch, one Loop/Scan iteration)."""
    producer = {out: node for node in graph.node for out in node.output if out}
    memo: dict[int, int] = {}
    best = 0
    for start in graph.node:
        # Iterative DFS: deep nets would overflow Python's recursion limit.
        stack = [(start, False)]
        while stack:
            node, ready = stack.pop()
            key = id(node)
            if key in memo:
                continue
            parents = [producer[i] for i in _reads(node) if i in producer]
            if not ready:
                stack.append((node, True))
                stack.extend((p, False) for p in parents if id(p) not in memo)
                continue
            own = (1 if node.op_type in LAYER_OPS else 0) + nested(node, depth)
            memo[key] = own + max((memo.get(id(p), 0) for p in parents), default=0)
        best = max(best, memo[id(start)])
    return best


def _reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs and the outer tensors its bodies read by name."""
    names = list(node.input)
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            names.extend(name for inner in iter_graphs(body) for n in inner.node for name in n.input)
    return names


def parameter_count(graph: onnx.GraphProto) -> int:
    """Initializer and Constant elements, through If/Loop/Scan bodies as ``nested`` counts them."""
    total = sum(math.prod(init.dims) for init in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += math.prod(attr.t.dims)
        total += nested(node, parameter_count)
    return total


def graph_macs(graph: onnx.GraphProto, shapes: Mapping[str, Shape]) -> int | None:
    """MACs of the graph's layers, through If/Loop/Scan bodies; None if a layer's shape is unknown."""
    total = 0
    for node in graph.node:
        own, inner = node_macs(node, shapes), nested(node, lambda g: graph_macs(g, shapes))
        if own is None or inner is None:
            return None
        total += own + inner
    return total


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """Multiply-accumulates of one layer node, or None when a shape it needs is unknown."""
    def known(name: str) -> Shape | None:
        shape = shapes.get(name)
        return shape if shape is not None and all(d is not None for d in shape) else None

    if node.op_type == "Conv" and len(node.input) > 1:
        out, weight = known(node.output[0]), known(node.input[1])
        if out is None or weight is None:
            return None
        # Every output element reads C/g * prod(k) weights.
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose" and len(node.input) > 1:
        x, weight = known(node.input[0]), known(node.input[1])
        if x is None or weight is None:
            return None
        return math.prod(x) * math.prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a, out = known(node.input[0]), known(node.output[0])
        if a is None or out is None or not a:
            return None
        reduce_dim = a[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else a[-1]
        return math.prod(out) * int(reduce_dim)
    return 0


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def model_stats(model: onnx.ModelProto, concrete_shapes: Mapping[str, Shape]) -> dict:
    """The before/after numbers of the report. ``macs`` is None if any layer's shape is unknown."""
    graph = model.graph
    return {
        "nodes": node_count(graph),
        "convs": node_count(graph, CONV_OPS),
        "depth": depth(graph),
        "params": parameter_count(graph),
        "macs": graph_macs(graph, concrete_shapes),
    }
