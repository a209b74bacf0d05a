"""The runtime fusions a rewrite must not break: onnxruntime's CPU patterns, as a table.

onnxruntime fuses some node groups into one kernel at load time (its Level 2 transformers). A
rewrite that moves part of such a group elsewhere leaves a smaller graph that runs slower: onnxsim
folds GELU's final ``* 0.5`` into the next conv, the Gelu is no longer fused and PP-OCRv6 runs
6-13% slower. Each pattern here is matched as onnxruntime's transformer matches it (see the
function's docstring for the source file), and yields an *anchor* (the node the fused kernel is
built around) and a *body* (the nodes folded into it).

A rewrite breaks an instance when it removes a body node while the anchor stays: the body's
work would move elsewhere and the runtime could no longer fuse it. Replacing the anchor together
with its body (MatMul + Add into one Gemm) or removing a body node that computes nothing (an
identity activation) is not breaking. ``docs/fusions.md`` has the measured cost of each pattern
kept and broken (``tools/fusion_benchmark.py``).

Not in the table, because onnxruntime (1.32, CPU) does not fuse them and folding them
measured faster: a hand-built HardSwish ``x * Relu6(x + 3) / 6`` (its ``/ 6`` folds into the
next conv), ``x * HardSigmoid(x)`` (no fusion to HardSwish on CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import onnx_graphsurgeon as gs

from graphfold.graph import const_value

# Activations onnxruntime's CPU provider fuses into the Conv before them (conv_activation_fusion.cc,
# conv_add_act_fusion.cc); Clip only with constant bounds.
CONV_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid")


@dataclass(frozen=True, eq=False)
class Fusion:
    """One instance of a runtime fusion in the graph."""

    name: str
    anchor: gs.Node
    body: tuple[gs.Node, ...]


def _lone_reader(node: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    """The single node reading ``node``'s only output, if the output is not a graph output."""
    if len(node.outputs) != 1 or node.outputs[0].name in graph_outputs:
        return None
    readers = node.outputs[0].outputs
    return readers[0] if len(readers) == 1 else None


def _is_scalar(tensor: gs.Tensor, expected: float, rtol: float = 1e-6) -> bool:
    value = const_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return False
    return math.isclose(float(value.reshape(-1)[0]), expected, rel_tol=rtol, abs_tol=0.0)


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    others = [t for t in node.inputs if t is not tensor]
    return others[0] if len(node.inputs) == 2 and len(others) == 1 else None


def _fusable_activation(node: gs.Node) -> bool:
    if node.op not in CONV_ACTIVATIONS:
        return False
    # Clip fuses only when its bounds are known at load time (attributes or constants).
    return node.op != "Clip" or all(const_value(t) is not None for t in node.inputs[1:] if t.name)


def gelu(node: gs.Node, graph_outputs: set[str]) -> Iterator[Fusion]:
    """``x * 0.5 * (1 + erf(x / sqrt2))`` in both of gelu_fusion.cc's forms, anchored at the Div:
    Div(x, sqrt2) -> Erf -> Add(1) -> Mul(x*0.5, .)  or  -> Mul(x, .) -> Mul(., 0.5)."""
    # sqrt(2) as onnxruntime accepts it: exact, or BERT's float approximation.
    if node.op != "Div" or len(node.inputs) != 2 or not (
            _is_scalar(node.inputs[1], math.sqrt(2)) or _is_scalar(node.inputs[1], 1.4142099618911743)):
        return
    x = node.inputs[0]
    erf = _lone_reader(node, graph_outputs)
    add = erf and erf.op == "Erf" and _lone_reader(erf, graph_outputs)
    if not add or add.op != "Add" or not _is_scalar(_other_input(add, erf.outputs[0]), 1.0):
        return
    mul = _lone_reader(add, graph_outputs)
    if mul is None or mul.op != "Mul":
        return
    other = _other_input(mul, add.outputs[0])
    if other is None:
        return
    half = other.inputs[0] if len(other.inputs) == 1 else None
    if half is not None and half.op == "Mul" and x in half.inputs and \
            _is_scalar(_other_input(half, x), 0.5) and _lone_reader(half, graph_outputs) is mul:
        yield Fusion("Gelu", node, (node, erf, add, half, mul))  # x*0.5 first
        return
    final = _lone_reader(mul, graph_outputs)
    if other is x and final is not None and final.op == "Mul" and \
            _is_scalar(_other_input(final, mul.outputs[0]), 0.5):
        yield Fusion("Gelu", node, (node, erf, add, mul, final))  # * 0.5 last


def conv_activation(node: gs.Node, graph_outputs: set[str]) -> Iterator[Fusion]:
    """Conv whose only reader is a fusable activation (conv_activation_fusion.cc)."""
    if node.op != "Conv":
        return
    act = _lone_reader(node, graph_outputs)
    if act is not None and _fusable_activation(act):
        yield Fusion(f"Conv+{act.op}", node, (act,))


def conv_add(node: gs.Node, graph_outputs: set[str], shapes: Callable[[gs.Tensor], tuple | None]) -> Iterator[Fusion]:
    """Conv (with a bias) + a residual Add of an equally shaped 4-D tensor, + an activation
    (conv_add_act_fusion.cc)."""
    if node.op != "Conv" or len(node.inputs) < 3 or not node.inputs[2].name:
        return  # onnxruntime skips a Conv without bias here
    add = _lone_reader(node, graph_outputs)
    if add is None or add.op != "Add":
        return
    other = _other_input(add, node.outputs[0])
    if other is None or const_value(other) is not None:
        return
    mine, theirs = shapes(node.outputs[0]), shapes(other)
    if mine is None or len(mine) != 4 or mine != theirs:
        return
    act = _lone_reader(add, graph_outputs)
    if act is not None and _fusable_activation(act):
        yield Fusion(f"Conv+Add+{act.op}", node, (add, act))
    else:
        yield Fusion("Conv+Add", node, (add,))


def matmul_add(node: gs.Node, graph_outputs: set[str], shapes: Callable[[gs.Tensor], tuple | None]) -> Iterator[Fusion]:
    """MatMul by a 2-D matrix + Add of an [N] bias, which onnxruntime turns into a Gemm
    (matmul_add_fusion.cc)."""
    if node.op != "MatMul" or len(node.inputs) != 2:
        return
    add = _lone_reader(node, graph_outputs)
    if add is None or add.op != "Add":
        return
    b_shape = shapes(node.inputs[1])
    bias = _other_input(add, node.outputs[0])
    bias_shape = shapes(bias) if bias is not None else None
    if b_shape is None or len(b_shape) != 2 or bias_shape is None or len(bias_shape) not in (1, 2):
        return
    if bias_shape[-1] == b_shape[1] and (len(bias_shape) == 1 or bias_shape[0] == 1):
        yield Fusion("MatMul+Add", node, (add,))


Shapes = Callable[[gs.Tensor], "tuple | None"]

# A body node sits at most this many producers below its anchor (Gelu's final Mul: 4).
ANCHOR_DEPTH = 4


def fusions_at(node: gs.Node, graph_outputs: set[str], shapes: Shapes) -> list[Fusion]:
    """The fusion instances anchored at ``node``."""
    return [*gelu(node, graph_outputs), *conv_activation(node, graph_outputs),
            *conv_add(node, graph_outputs, shapes), *matmul_add(node, graph_outputs, shapes)]


def find_fusions(graph: gs.Graph, graph_outputs: set[str], shapes: Shapes) -> list[Fusion]:
    """Every fusion instance in ``graph``."""
    return [fusion for node in graph.nodes for fusion in fusions_at(node, graph_outputs, shapes)]


def _anchors_near(nodes: Iterable[gs.Node]) -> dict[int, gs.Node]:
    """Every node that could anchor a fusion containing one of ``nodes``: their producers up to
    ANCHOR_DEPTH steps back, and the other readers of their inputs (Gelu's ``x * 0.5`` and its
    Div both read x)."""
    found: dict[int, gs.Node] = {}
    frontier = list(nodes)
    for node in frontier:
        found[id(node)] = node
        for tensor in node.inputs:
            if not isinstance(tensor, gs.Constant):  # a shared constant's readers are no siblings
                found.update((id(reader), reader) for reader in tensor.outputs)
    for _ in range(ANCHOR_DEPTH):
        frontier = [t.inputs[0] for node in frontier for t in node.inputs if len(t.inputs) == 1]
        found.update((id(node), node) for node in frontier)
    return found


def broken_fusion(removed: Iterable[gs.Node], graph_outputs: set[str], shapes: Shapes) -> Fusion | None:
    """The first fusion that removing ``removed`` would break: a body node goes, the anchor stays.
    Only the neighbourhood of ``removed`` is searched, so asking costs the same on any graph size."""
    removed = list(removed)
    gone = {id(node) for node in removed}
    for anchor in _anchors_near(removed).values():
        for fusion in fusions_at(anchor, graph_outputs, shapes):
            # An anchor that is also body (Gelu's Div) is never rebuilt with the rest.
            rebuilt = id(fusion.anchor) in gone and not any(n is fusion.anchor for n in fusion.body)
            if not rebuilt and any(id(n) in gone for n in fusion.body):
                return fusion
    return None


def describe(fusion: Fusion) -> str:
    """The decline sentence for a rewrite that would break ``fusion``."""
    return (f"keeps onnxruntime's {fusion.name} fusion around {fusion.anchor.op} {fusion.anchor.name!r}: "
            f"folding it away makes the graph smaller but slower")


