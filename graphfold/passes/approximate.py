"""Approximate rewrites: each changes the outputs, by an amount only data can tell.

* ``snap-activation`` (Layer Folding): ``PRelu(x, a) ~ x`` when every slope is near 1
  (``|1 - a| <= 1 - A`` for ``--snap-slope A``); the change is ``(1 - a) * min(x, 0)``, so its
  size is ``|1 - a| * max(-x)`` over the data. ``Relu(x) = x`` where x was never negative on the
  calibration data: exact there, unproven elsewhere.
* ``drop-epsilon-branch`` (epsilon-ResNet) and ``drop-ranked-branch`` (Network Implosion):
  ``skip + F ~ skip`` for a residual branch F; the change is F itself, ``max|F|`` on the data.
* ``merge-conv-border``: ``conv2(conv1(x)) ~ conv(x)`` for a padded conv2 after a spatial conv1,
  exact in the interior; at the border the merged conv reads conv1 applied to zero padding where
  the original read zeros.

Each pass here only proposes and builds; ``check`` returns ``Approx(bound)`` with the bound the
statistics give (``inf`` where they give none) and never mutates. What is applied is decided in
:mod:`graphfold.approx`, which measures every candidate's effect on the model's outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphfold import cost, kernels
from graphfold.engine import Approx, Change, Decision, FoldContext, Match, Pass, Reject
from graphfold.graph import bypass, bypass_reason, const_value, conv_params, detach, make_conv, producer, \
    sole_consumer
from graphfold.passes.conv_chain import Segment, compose_exact, conv_reason
from graphfold.stats import LAYER_OPS

SUM_OPS = ("Add", "Sum")


@dataclass
class TensorStats:
    """One tensor over the calibration data: extremes, sum of squares and element count."""

    minimum: float = math.inf
    maximum: float = -math.inf
    sum_squares: float = 0.0
    count: int = 0
    shape: tuple | None = None  # of the first batch

    def add(self, value: np.ndarray) -> None:
        value = np.asarray(value, np.float64)
        if self.shape is None:
            self.shape = value.shape
        if value.size:
            self.minimum = min(self.minimum, float(np.min(value)))
            self.maximum = max(self.maximum, float(np.max(value)))
            self.sum_squares += float(np.sum(value * value))
            self.count += value.size

    @property
    def max_abs(self) -> float:
        return max(abs(self.minimum), abs(self.maximum)) if self.count else 0.0


Stats = Mapping[str, TensorStats]


# --- residual branches ------------------------------------------------------------------------

@dataclass
class Residual:
    """``add = skip + branch``: the input indices of the shortcut and of the branch F."""

    add: gs.Node
    skip: int
    branch: int


def find_residuals(graph: gs.Graph) -> list[Residual]:
    """Adds of two computed tensors where one path (the branch) holds more layers than the other.

    An identity shortcut is an ancestor of the branch; for a projection shortcut both paths
    start at a common fork, and the branch is the one with more Conv/Gemm layers from it.
    """
    graph.toposort()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    found = []
    for node in graph.nodes:
        if node.op not in SUM_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        a, b = node.inputs
        if a is b or const_value(a) is not None or const_value(b) is not None:
            continue
        up_a, up_b = _ancestors(a), _ancestors(b)
        if id(a) in up_b:
            found.append(Residual(node, 0, 1))
        elif id(b) in up_a:
            found.append(Residual(node, 1, 0))
        else:
            common = [t for key, t in up_a.items() if key in up_b]
            if not common:
                continue
            fork = max(common, key=lambda t: order.get(id(producer(t)), -1))
            la, lb = _layers_between(graph, order, fork, a), _layers_between(graph, order, fork, b)
            if la != lb:
                found.append(Residual(node, *((0, 1) if lb > la else (1, 0))))
    return found


def _ancestors(tensor: gs.Tensor) -> dict[int, gs.Tensor]:
    """The tensor and every non-constant tensor it is computed from, by id."""
    seen: dict[int, gs.Tensor] = {}
    stack = [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen or isinstance(t, gs.Constant):
            continue
        seen[id(t)] = t
        node = producer(t)
        if node is not None:
            stack.extend(node.inputs)
    return seen


def _layers_between(graph: gs.Graph, order: dict[int, int], fork: gs.Tensor, target: gs.Tensor) -> int:
    """Most Conv/Gemm layers on a path from ``fork`` to ``target`` (nodes in topological order)."""
    depth = {id(fork): 0}
    start = order.get(id(producer(fork)), -1) + 1
    stop = order.get(id(producer(target)), -1)
    for node in graph.nodes[start:stop + 1]:
        reached = [depth[id(t)] for t in node.inputs if id(t) in depth]
        if reached:
            for out in node.outputs:
                depth[id(out)] = max(reached) + (node.op in LAYER_OPS)
    return depth.get(id(target), 0)


def branch_nodes(graph: gs.Graph, residual: Residual, graph_outputs: set[str]) -> list[gs.Node]:
    """Nodes that compute nothing but the branch: dead once the Add stops reading it."""
    add, dead = residual.add, set()
    nodes = []
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in reversed(graph.nodes[:index[id(add)]]):
        if node.outputs and all(_unused(t, residual, dead, graph_outputs) for t in node.outputs):
            dead.add(id(node))
            nodes.append(node)
    return nodes


def _unused(tensor: gs.Tensor, residual: Residual, dead: set[int], graph_outputs: set[str]) -> bool:
    if tensor.name in graph_outputs:
        return False
    add = residual.add
    for consumer in tensor.outputs:
        if consumer is add:
            if any(t is tensor for k, t in enumerate(add.inputs) if k != residual.branch):
                return False
        elif id(consumer) not in dead:
            return False
    return True


def node_cost(ctx: FoldContext, node: gs.Node) -> float:
    """The cost model's estimate for any node: convs by MACs, the rest by memory traffic."""
    if node.op == "Conv":
        params = conv_params(node, ctx.static_spatial(node.inputs[0]))
        if params is not None:
            return cost.conv_cost(params, ctx.concrete_shape(node.inputs[0]))
    computed = [t for t in node.inputs if t.name and const_value(t) is None]
    shape = ctx.concrete_shape(node.outputs[0]) if node.outputs else None
    # PRelu and Add of a constant map break onnxruntime's blocked conv layout (METHODS.md, Cost).
    return cost.elementwise_cost(shape, inputs=max(len(computed), 1), unfusable=node.op == "PRelu")


def _same_shape(ctx: FoldContext, a: gs.Tensor, b: gs.Tensor) -> bool:
    for lookup in (ctx.static_shape, ctx.concrete_shape):
        sa, sb = lookup(a), lookup(b)
        if sa is not None and sb is not None and None not in sa and None not in sb:
            return tuple(sa) == tuple(sb)
    return False


def learned_scales(model: onnx.ModelProto) -> dict[str, float]:
    """``|s|`` of residual branches that end in a multiplication by a scalar constant, by Add name.

    Read from the original model: the exact pipeline folds such a scale into the conv before it.
    """
    graph = gs.import_onnx(model)
    scales = {}
    for residual in find_residuals(graph):
        node = producer(residual.add.inputs[residual.branch])
        if node is not None and node.op == "Mul" and len(node.inputs) == 2:
            for tensor in node.inputs:
                value = const_value(tensor)
                if value is not None and value.size == 1:
                    scales[residual.add.name] = float(abs(np.asarray(value, np.float64).reshape(-1)[0]))
    return scales


class DropResidualBranch(Pass):
    """``skip + F -> skip`` for residual branches; ``epsilon`` limits it to ``max|F| <= epsilon``."""

    name = "drop-ranked-branch"
    summary = "drop residual branches of least measured importance (--drop-branches, --target-depth)"

    def __init__(self, stats: Stats, epsilon: float | None = None) -> None:
        self.stats = stats
        self.epsilon = epsilon

    def moved_nodes(self, match: Match) -> tuple:
        return ()  # the branch's work is dropped, not moved

    def match(self, ctx: FoldContext):
        for residual in find_residuals(ctx.graph):
            # Statistics are keyed by the tensors as measured; earlier rewrites may rename them.
            branch = residual.add.inputs[residual.branch]
            yield Match((residual.add,), {"residual": residual, "stats": self.stats.get(branch.name),
                                          "branch": branch.name})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        residual: Residual = match.data["residual"]
        add = residual.add
        skip, out = add.inputs[residual.skip], add.outputs[0]
        stats: TensorStats | None = match.data["stats"]
        if stats is None or not stats.count:
            return Reject(f"branch {match.data['branch']!r} was not measured on the calibration data")
        if self.epsilon is not None and stats.max_abs > self.epsilon:
            return Reject(f"max|F| = {stats.max_abs:.3g} > --epsilon {self.epsilon:.3g}")
        if not _same_shape(ctx, skip, out):
            return Reject("cannot show the branch does not broadcast the shortcut to a larger shape")
        reason = bypass_reason(add, skip, out, ctx.graph_outputs)
        return Reject(reason) if reason else Approx(stats.max_abs, "max|F| on calibration data")

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        residual: Residual = match.data["residual"]
        add = residual.add
        dead = branch_nodes(ctx.graph, residual, ctx.graph_outputs)
        bypass(add, add.inputs[residual.skip], add.outputs[0], ctx.graph_outputs)
        layers = sum(1 for n in dead if n.op in LAYER_OPS)
        return Change([add, *dead], [], f"dropped the residual branch of {add.op} {add.name!r} ({layers} layers, "
                                        f"{len(dead)} nodes): max|F| {decision.bound:.3g} on calibration data")


class DropEpsilonBranch(DropResidualBranch):
    name = "drop-epsilon-branch"
    summary = "drop residual branches with max|F| <= --epsilon on calibration data (epsilon-ResNet)"


# --- activations ------------------------------------------------------------------------------

class SnapActivations(Pass):
    name = "snap-activation"
    summary = "remove PRelu/LeakyRelu with slopes near 1 and Relus never negative on calibration data"

    def __init__(self, stats: Stats, snap_slope: float) -> None:
        self.stats = stats
        self.snap_slope = snap_slope

    def moved_nodes(self, match: Match) -> tuple:
        return ()  # a removed activation leaves nothing to fuse

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op in ("PRelu", "LeakyRelu", "Relu") and node.inputs and len(node.outputs) == 1:
                # Statistics are keyed by the tensors as measured; earlier rewrites may rename them.
                stats = self.stats.get(node.inputs[0].name)
                if node.op != "Relu" or (stats is not None and stats.count > 0 and stats.minimum >= 0):
                    yield Match((node,), {"stats": stats, "input": node.inputs[0].name})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        node = match.anchor
        x, y = node.inputs[0], node.outputs[0]
        stats: TensorStats | None = match.data["stats"]
        if stats is None or not stats.count:
            return Reject(f"input {match.data['input']!r} was not measured on the calibration data")
        if node.op == "Relu":
            slopes = np.zeros(1)
        elif node.op == "LeakyRelu":
            slopes = np.array([float(node.attrs.get("alpha", 0.01))])
        else:
            value = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if value is None:
                return Reject("PRelu slope is not constant")
            slopes = np.asarray(value, np.float64).reshape(-1)
            if value.size != 1 and not _same_shape(ctx, x, y):
                return Reject("cannot show the slope does not broadcast the input to a larger shape")
        worst = float(slopes[np.argmax(np.abs(1 - slopes))])
        # |1 - a| <= 1 - A: a slope of 1.3 is as far from the identity as one of 0.7.
        if node.op != "Relu" and abs(1 - worst) > 1 - self.snap_slope + 1e-12:
            return Reject(f"slope {worst:.4g} is further from 1 than --snap-slope {self.snap_slope:g} allows")
        reason = bypass_reason(node, x, y, ctx.graph_outputs)
        if reason:
            return Reject(reason)
        # The change is (a - 1) * min(x, 0): bounded by |1 - a| times the most negative input.
        return Approx(abs(1 - worst) * max(0.0, -stats.minimum), "|1 - slope| * max(-x) on calibration data")

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node = match.anchor
        x = node.inputs[0]
        low = match.data["stats"].minimum
        bypass(node, x, node.outputs[0], ctx.graph_outputs)
        what = "never negative" if node.op == "Relu" else f"change bounded by {decision.bound:.3g}"
        return Change([node], [], f"removed {node.op} {node.name!r}: input min {low:.3g} on calibration "
                                  f"data, {what}")


# --- interior-exact conv merges ---------------------------------------------------------------

@dataclass(frozen=True)
class BorderMerge:
    """What ``merge-conv-border``'s check hands its rewrite: the merged conv and the cost it saves."""

    merged: kernels.ConvParams
    benefit: float


class MergeConvBorder(Pass):
    name = "merge-conv-border"
    summary = "merge a padded conv after a spatial conv (exact in the interior only; --allow-border)"

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op != "Conv" or not node.outputs:
                continue
            nxt = sole_consumer(node.outputs[0], ctx.graph_outputs)
            if nxt is not None and nxt.op == "Conv" and nxt.inputs[0] is node.outputs[0]:
                yield Match((node, nxt))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        first, second = match.nodes
        for node in match.nodes:
            reason = conv_reason(ctx, node)
            if reason:
                return Reject(reason)
        p1 = conv_params(first, ctx.static_spatial(first.inputs[0]))
        p2 = conv_params(second, ctx.static_spatial(second.inputs[0]))
        state = Segment(0, 1, p1, None, 0.0)
        exact = compose_exact(ctx, state, p2, first.inputs[0])
        if not isinstance(exact, str):
            return Reject("the merge is exact: merge-conv-chain decides it")
        if "interior" not in exact:
            return Reject(exact)
        try:
            merged = kernels.compose(p1, p2)
        except kernels.NotMergeable as exc:
            return Reject(str(exc))
        spatial, out = ctx.static_spatial(first.inputs[0]), ctx.static_spatial(second.outputs[0])
        if spatial is None or out is None or None in spatial or None in out:
            return Reject("spatial dims are dynamic, so the merged output size cannot be checked")
        if kernels.output_spatial(merged, spatial) != tuple(out):
            return Reject("the merged conv's output size differs (odd size with stride)")
        shape = ctx.concrete_shape(first.inputs[0])
        before = cost.conv_cost(p1, shape) + cost.conv_cost(p2, shape)
        after = cost.conv_cost(merged, shape)
        if not ctx.options.fold_all and not cost.pays(before, after):
            return Reject(f"merging does not pay ({cost.ratio_text(before, after)}); --fold-all merges anyway")
        return Approx(math.inf, "measured on calibration data only", BorderMerge(merged, before - after))

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        first, second = match.nodes
        merged = decision.plan.merged
        x, out = first.inputs[0], second.outputs[0]
        detach([first, second])
        conv = make_conv(ctx.scope, f"{first.name}_border_merged", x, out, merged, merged.weight.dtype)
        ctx.graph.nodes.append(conv)
        size = "x".join(str(e) for e in merged.extent)
        return Change([first, second], [conv], f"merged Conv {first.name!r} and Conv {second.name!r} into one {size} "
                                               "conv (exact in the interior only)")
