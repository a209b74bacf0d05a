"""Exact clean-up passes: constant folding, dead-node elimination, Identity/Dropout removal.

Identities: a node whose inputs are all constants equals the constant it computes; a node
none of whose outputs is read contributes nothing; ``Identity(x) = x`` and, at inference,
``Dropout(x) = x``.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import bypass, bypass_reason, const_value

log = logging.getLogger(__name__)

# Nodes whose value differs from run to run may not be replaced by one sample of it.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
# Folding must not turn a cheap generator (ConstantOfShape, Expand, Tile) into a huge initializer.
FOLD_SIZE_LIMIT = 16 * 2**20


class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate nodes whose inputs are all constants (Constant, ConstantOfShape, Identity chains...)"

    def match(self, ctx: FoldContext):
        foldable = []
        constant: set[str] = set()
        for node in ctx.graph.nodes:
            if node.op in NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                continue
            inputs = [t for t in node.inputs if t.name]
            if all(const_value(t) is not None or t.name in constant for t in inputs):
                foldable.append(node)
                constant.update(t.name for t in node.outputs)
        if foldable:
            yield Match(tuple(foldable))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        return Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        _quiet_graphsurgeon()
        ctx.graph.toposort()
        ctx.graph.fold_constants(fold_shapes=False, partitioning="basic", size_threshold=FOLD_SIZE_LIMIT,
                                 should_exclude_node=lambda n: n.op in NONDETERMINISTIC_OPS,
                                 flatten_subgraphs=False)
        folded = [n for n in match.nodes if n.outputs and all(isinstance(t, gs.Constant) for t in n.outputs)]
        for node in folded:
            node.outputs.clear()
        return Change(folded, [], f"folded {len(folded)} constant node(s)")


def _quiet_graphsurgeon() -> None:
    # onnx-graphsurgeon's logger writes warnings to stdout; only the CLI may print.
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.CRITICAL


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
