"""Exact clean-up passes: constant folding, dead-node elimination, Identity/Dropout removal.

Identities: a node whose inputs are all constants equals the constant it computes; so does
``Shape(x)``, or a ``Gather``/``Slice`` of it, when the dims it reads are fixed by the model
(onnx-graphsurgeon's ``fold_shapes``), and the shape arithmetic after it. A dim the model
leaves symbolic (a dynamic batch) stays computed at run time: the folded model accepts every
input the original did, and ``--input-shape`` never specializes it. A node none of whose
outputs is read contributes nothing; ``Identity(x) = x`` and, at inference, ``Dropout(x) = x``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import bypass, bypass_reason, const_value

log = logging.getLogger(__name__)

# Nodes whose value differs from run to run may not be replaced by one sample of it.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
# Folding must not turn a cheap generator (ConstantOfShape, Expand, Tile) into a huge initializer.
FOLD_SIZE_LIMIT = 16 * 2**20
# Sequences and optionals have no initializer form; their consumers then stay unfolded too.
NON_TENSOR_PREFIXES = ("Sequence", "SplitToSequence", "Optional")
# A quantized graph keeps its int8 weights and QDQ pairs (graphsurgeon would not fold them either).
QUANTIZATION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


class FoldConstants(Pass):
    name = "fold-constants"
    summary = ("evaluate nodes whose inputs are all constants (Constant, ConstantOfShape, Identity chains...) "
               "and shape arithmetic on dims the model fixes")

    def match(self, ctx: FoldContext):
        foldable = []
        constant: set[str] = set()
        for node in ctx.graph.nodes:
            if not _may_fold(node):
                continue
            if node.op == "Shape" and any(isinstance(d, int) for d in ctx.static_shape(node.inputs[0]) or ()):
                foldable.append(node)  # graphsurgeon decides which of its dims can be read off
                continue
            inputs = [t for t in node.inputs if t.name]
            if not all(const_value(t) is not None or t.name in constant for t in inputs):
                continue
            size = _result_bytes(ctx, node)
            if size is not None and size > FOLD_SIZE_LIMIT:
                yield Match((node,), {"too_large": size})
                continue
            foldable.append(node)
            constant.update(t.name for t in node.outputs)
        if foldable:
            yield Match(tuple(foldable))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        if "too_large" in match.data:
            return Reject(f"result is {match.data['too_large'] / 2**20:.0f} MiB, "
                          f"over the {FOLD_SIZE_LIMIT // 2**20} MiB constant-folding limit")
        values = _rearranged(ctx, match.nodes)
        if values is None:
            values = _evaluate(ctx)
        if not values:
            return Reject("onnxruntime could not evaluate these constant nodes")
        return Exact(plan=values)

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        values: dict[str, np.ndarray] = decision.plan
        # Shape folding reaches past the matched nodes (a Gather of a Shape, the Concat after it).
        folded = [n for n in ctx.graph.nodes if n.outputs and all(t.name in values for t in n.outputs)]
        for node in folded:
            for tensor in node.outputs:
                tensor.to_constant(values[tensor.name])
            node.outputs.clear()
        return Change(folded, [], f"folded {len(folded)} constant node(s)", count=len(folded))


def _rearranged(ctx: FoldContext, nodes) -> dict[str, np.ndarray] | None:
    """The nodes' values when every one of them is a Constant or only rearranges constants
    (Unsqueeze, Reshape, Transpose...: no arithmetic, so numpy's result is the runtime's bit for
    bit), else None and onnxruntime evaluates them. Old exports are full of them (an Unsqueeze per BatchNorm scale),
    and an onnxruntime session over a copy of the graph costs far more than moving the values."""
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op == "Constant" and len(node.outputs) == 1 and isinstance(node.attrs.get("value"), gs.Constant):
            values[node.outputs[0].name] = np.asarray(node.attrs["value"].values)
            continue
        rearrange = _REARRANGE.get(node.op)
        if rearrange is None or len(node.outputs) != 1 or not node.inputs:
            return None
        inputs = [values[t.name] if t.name in values else const_value(t) if t.name else None for t in node.inputs]
        if inputs[0] is None or any(v is None for v, t in zip(inputs, node.inputs) if t.name):
            return None
        try:
            values[node.outputs[0].name] = np.ascontiguousarray(rearrange(node, inputs, ctx.graph.opset))
        except (ValueError, IndexError, TypeError):  # invalid axes or shapes: the runtime's to judge
            return None
    return values


def _axes(node: gs.Node, inputs: list, opset: int) -> list[int] | None:
    # Opset 13 moved Squeeze/Unsqueeze's axes from an attribute to an optional second input.
    if opset >= 13:
        return None if len(inputs) < 2 or inputs[1] is None else [int(a) for a in np.asarray(inputs[1]).ravel()]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    x, axes = inputs[0], _axes(node, inputs, opset)
    if not axes:
        raise ValueError("Unsqueeze without axes")
    rank = x.ndim + len(axes)
    normalized = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(normalized)) != len(normalized) or not all(0 <= a < rank for a in normalized):
        raise ValueError("invalid Unsqueeze axes")
    for axis in normalized:
        x = np.expand_dims(x, axis)
    return x


def _squeeze(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    x, axes = inputs[0], _axes(node, inputs, opset)
    if axes is None:
        return np.squeeze(x)
    normalized = tuple(a + x.ndim if a < 0 else a for a in axes)
    if any(not 0 <= a < x.ndim or x.shape[a] != 1 for a in normalized):
        raise ValueError("invalid Squeeze axes")
    return np.squeeze(x, axis=normalized)


def _reshape(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    x, shape = inputs[0], [int(d) for d in np.asarray(inputs[1]).ravel()]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # 0 copies the input's dim
    return x.reshape(shape)


def _flatten(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    x = inputs[0]
    axis = int(node.attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    if not 0 <= axis <= x.ndim:
        raise ValueError("invalid Flatten axis")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    perm = node.attrs.get("perm")
    return np.transpose(inputs[0], None if perm is None else [int(p) for p in perm])


_REARRANGE = {
    "Identity": lambda node, inputs, opset: inputs[0],
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
}


def _evaluate(ctx: FoldContext) -> dict[str, np.ndarray]:
    """The values of the node outputs that fold, by tensor name, computed on a copy of the graph
    (weights shared, not copied) so that ``check`` leaves the graph as it found it."""
    clone = ctx.graph.copy()
    _float32_constants(clone)
    clone.toposort()
    outputs = [list(n.outputs) for n in clone.nodes if n.outputs]
    # One onnxruntime session for all constants first; only if that fails, one per output
    # ("basic" partitioning copies the graph for each, quadratic on a large model).
    for partitioning in (None, "basic"):
        with _static_shapes(ctx, clone), _no_inexact_cast_elision(clone):
            _fold_with_graphsurgeon(clone, partitioning)
        # graphsurgeon turns a folded node's outputs into Constants and disconnects them from it;
        # what it leaves (over the limit, or not evaluable) is not folded.
        values = {t.name: t.values for tensors in outputs if all(isinstance(t, gs.Constant) for t in tensors)
                  for t in tensors}
        if values:
            return values
    return {}


def _fold_with_graphsurgeon(graph: gs.Graph, partitioning: str | None) -> None:
    # graphsurgeon folds a copy of the graph, so it is told which nodes by kind, not identity.
    try:
        with quiet_graphsurgeon():
            graph.fold_constants(fold_shapes=True, partitioning=partitioning, size_threshold=FOLD_SIZE_LIMIT,
                                 should_exclude_node=lambda n: not _may_fold(n), flatten_subgraphs=False)
    except Exception:
        # It evaluates everything before replacing tensors one by one, so what it replaced before
        # failing is correct; the caller counts what was folded.
        log.debug("graphsurgeon constant folding failed", exc_info=True)


class _static_shapes:
    """Give graphsurgeon's tensors the model's static shapes (symbolic dims None, which it treats as
    dynamic) for the length of a fold: it reads ``Shape`` results off them. Restored afterwards, so
    the exported model's value_info is what it was. It ignores ``Shape``'s start/end attributes
    (opset 15), so the tensors such a Shape reads show it no shape at all."""

    def __init__(self, ctx: FoldContext, graph: gs.Graph) -> None:
        self.ctx, self.graph = ctx, graph
        self.saved: list[tuple[gs.Variable, object]] = []

    def __enter__(self) -> None:
        for tensor in self.graph.tensors().values():
            shape = self.ctx.static_shapes.get(tensor.name)
            if isinstance(tensor, gs.Variable) and shape is not None:
                self.saved.append((tensor, tensor.shape))
                tensor.shape = list(shape)
        for node in self.graph.nodes:
            if node.op == "Shape" and ("start" in node.attrs or "end" in node.attrs):
                tensor = node.inputs[0]
                if isinstance(tensor, gs.Variable):
                    self.saved.append((tensor, tensor.shape))
                    tensor.shape = None

    def __exit__(self, *exc) -> None:
        for tensor, shape in reversed(self.saved):
            if isinstance(tensor, gs.Variable):
                tensor.shape = shape


# graphsurgeon's shape folding first "elides" int -> float -> op -> int cast pairs around these ops,
# computing the op in integers. That is exact only if every other input is an integral constant:
# a float tensor would be fed to an integer op, and a constant 0.5 would become 0.
_CAST_ELISION_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "Concat"}


class _no_inexact_cast_elision:
    """For the length of a fold, give every node whose cast elision would not be exact one more
    reader (an Identity) of its outputs: graphsurgeon elides only where Casts alone read them."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.pins: list[tuple[gs.Graph, gs.Node]] = []

    def __enter__(self) -> None:
        self._pin(self.graph)

    def _pin(self, graph: gs.Graph) -> None:
        for node in list(graph.nodes):
            for attr in node.attrs.values():
                if isinstance(attr, gs.Graph):  # graphsurgeon folds If/Loop bodies too
                    self._pin(attr)
            if _elision_is_exact(node):
                continue
            for tensor in node.outputs:
                pin = gs.Node("Identity", inputs=[tensor], outputs=[gs.Variable(f"{tensor.name}.pinned")])
                graph.nodes.append(pin)
                self.pins.append((graph, pin))

    def __exit__(self, *exc) -> None:
        for graph, pin in self.pins:
            pin.inputs.clear()
            pin.outputs.clear()
            graph.nodes.remove(pin)


def _elision_is_exact(node: gs.Node) -> bool:
    if node.op not in _CAST_ELISION_OPS:
        return True
    casts = [t for t in node.inputs if _is_cast_to_float(t)]
    if not casts:
        return True
    for tensor in node.inputs:
        if any(tensor is cast for cast in casts):
            continue
        if not isinstance(tensor, gs.Constant):
            return False
        values = np.asarray(tensor.values)
        if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
            return False
    return True


def _is_cast_to_float(tensor: gs.Tensor) -> bool:
    return any(p.op == "Cast" and p.attrs.get("to") == onnx.TensorProto.FLOAT for p in tensor.inputs)


def _may_fold(node: gs.Node) -> bool:
    if node.op in NONDETERMINISTIC_OPS or node.op in QUANTIZATION_OPS or node.domain not in (None, "", "ai.onnx"):
        return False
    if node.op.startswith(NON_TENSOR_PREFIXES):
        return False
    return not any(isinstance(a, gs.Graph) for a in node.attrs.values())


def _float32_constants(graph: gs.Graph) -> None:
    """Give Constant nodes' value_float(s) as float32 tensors: graphsurgeon would lower them with
    numpy's default float64, and the folded model would not type-check."""
    for node in graph.nodes:
        if node.op == "Constant" and len(node.attrs) == 1 and node.outputs:
            (name, value), = node.attrs.items()
            if name in ("value_float", "value_floats") and isinstance(value, (float, int, list, tuple)):
                node.attrs = {"value": gs.Constant(f"{node.outputs[0].name}.value", np.asarray(value, np.float32))}
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _float32_constants(attr)


def _result_bytes(ctx: FoldContext, node: gs.Node) -> int | None:
    """Size of the node's outputs where shape inference knows them (None when any is unknown)."""
    total = 0
    for tensor in node.outputs:
        shape = ctx.static_shape(tensor)
        if shape is None or any(d is None for d in shape):
            return None
        itemsize = np.dtype(tensor.dtype).itemsize if tensor.dtype is not None else 4
        total += math.prod(shape) * itemsize
    return total


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """Silence onnx-graphsurgeon's logger (it writes warnings to stdout, and only the CLI may print)
    for the duration, then give it back its level: a program importing graphfold keeps its logging.

    onnxruntime's global log level, which the sessions graphsurgeon opens to fold constants use,
    has no getter and so cannot be restored: the library leaves it alone, the CLI sets it.
    """
    from onnx_graphsurgeon.logger import G_LOGGER

    previous = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.severity = previous


class RemoveDeadNodes(Pass):
    name = "remove-dead-nodes"
    summary = "drop nodes none of whose outputs is used"

    def match(self, ctx: FoldContext):
        used = set(ctx.graph_outputs)
        for node in ctx.graph.nodes:
            for attr in node.attrs.values():
                if isinstance(attr, gs.Graph):
                    # Subgraphs may read outer tensors by name.
                    used.update(t.name for t in _subgraph_inputs(attr))
        dead = []
        # Reverse topological order lets one sweep find whole dead chains.
        ctx.graph.toposort()
        for node in reversed(ctx.graph.nodes):
            if any(t.name in used for t in node.outputs):
                used.update(t.name for t in node.inputs)
            else:
                dead.append(node)
        for node in dead:
            yield Match((node,))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        return Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node = match.anchor
        node.inputs.clear()
        node.outputs.clear()
        return Change([node], [], f"removed unused {node.op} {node.name!r}")


def _subgraph_inputs(graph: gs.Graph):
    for node in graph.nodes:
        yield from node.inputs
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from _subgraph_inputs(attr)


class RemoveIdentity(Pass):
    name = "remove-identity"
    summary = "remove Identity and inference-mode Dropout"

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op in ("Identity", "Dropout") and node.inputs and node.outputs:
                yield Match((node,))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        node = match.anchor
        if node.op == "Dropout":
            if len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1].name in ctx.graph_outputs):
                return Reject("Dropout's mask output is used")
            if len(node.inputs) > 2 and node.inputs[2].name:
                training = const_value(node.inputs[2])
                if training is None or bool(training):
                    return Reject("Dropout may run in training mode")
        reason = bypass_reason(node, node.inputs[0], node.outputs[0], ctx.graph_outputs)
        return Reject(reason) if reason else Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node = match.anchor
        bypass(node, node.inputs[0], node.outputs[0], ctx.graph_outputs)
        return Change([node], [], f"removed {node.op} {node.name!r}")
