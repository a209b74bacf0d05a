"""Merge parallel branches into one Conv; drop residual branches that are identically zero.

``sum_i conv_i(x) = conv(x)`` with the kernels zero-padded to the largest, centred where
their taps fall, and summed with their biases (RepVGG, ACNet, DBB); an identity branch is
the conv with a 1 at each channel's centre tap (``x + conv(x)`` folds the skip into the
kernel), and a BatchNormalization applied directly to x is a depthwise 1x1 conv. Exact
everywhere when the branches' strides are equal and their pads line up.

``x + F = x`` when F is produced by a layer whose weights and bias are all zero (a branch
whose last BatchNorm has gamma = beta = 0, once folded): exact for finite activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import cost, kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, bypass, bypass_reason, const_value, conv_params, detach, \
    float_const, make_const, make_conv, make_var, producer, sole_consumer
from graphfold.passes.conv_chain import conv_reason

SUM_OPS = ("Add", "Sum")


@dataclass(frozen=True)
class Term:
    """One summand: the node computing it (None for the identity) and its input."""

    node: gs.Node | None
    source: gs.Tensor


@dataclass(frozen=True)
class BranchMerge:
    """What the check hands the rewrite: the merged conv, and a constant map added after it (or None)."""

    merged: kernels.ConvParams
    offset: np.ndarray | None


def _term(ctx: FoldContext, tensor: gs.Tensor, owner: gs.Node) -> Term:
    node = producer(tensor)
    single = sole_consumer(tensor, ctx.graph_outputs) is owner
    if node is not None and single and node.op in ("Conv", "BatchNormalization") and node.inputs:
        return Term(node, node.inputs[0])
    return Term(None, tensor)


def _flatten_sum(ctx: FoldContext, node: gs.Node) -> tuple[list[gs.Node], list[tuple[gs.Tensor, gs.Node]]]:
    """The Add/Sum nodes of a nested sum rooted at ``node`` (inner sums used only there) and its
    summands, each with the sum node that reads it."""
    sums, terms, stack = [node], [], [(t, node) for t in node.inputs]
    while stack:
        tensor, owner = stack.pop(0)
        inner = producer(tensor)
        if inner is not None and inner.op in SUM_OPS and len(inner.outputs) == 1 and \
                sole_consumer(tensor, ctx.graph_outputs) is owner:
            sums.append(inner)
            stack.extend((t, inner) for t in inner.inputs)
        else:
            terms.append((tensor, owner))
    return sums, terms


def _term_params(ctx: FoldContext, terms: list[Term]) -> list[kernels.ConvParams] | str:
    """Each summand as a conv over the shared input (the identity and BatchNorms as 1x1 convs
    matching the convs' groups), or why one cannot be."""
    convs = [t for t in terms if t.node is not None and t.node.op == "Conv"]
    for t in convs:
        reason = conv_reason(ctx, t.node)
        if reason:
            return reason
    spatial = ctx.static_spatial(terms[0].source)
    forms = {id(t): conv_params(t.node, spatial) for t in convs}
    first = forms[id(convs[0])]
    params = []
    for t in terms:
        if t.node is not None and t.node.op == "BatchNormalization":
            form = _bn_as_conv(t.node, first.rank)
            if form is None:
                return "a BatchNormalization branch is not in inference mode with constant parameters"
        elif t.node is None:
            groups = {p.group for p in forms.values()}
            group = groups.pop() if len(groups) == 1 else 1
            if first.out_channels % group:
                group = 1
            form = kernels.identity_params(first.out_channels, (1,) * first.rank, first.weight.dtype, group)
        else:
            form = forms[id(t)]
        params.append(form)
    if len({p.weight.dtype for p in params}) != 1:
        return "branches have different weight dtypes"
    return params


def _bn_as_conv(node: gs.Node, rank: int) -> kernels.ConvParams | None:
    """A BatchNormalization on x as the depthwise 1x1 conv it equals, or None."""
    params = [float_const(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params) or node.attrs.get("training_mode", 0):
        return None
    if any(t.outputs for t in node.outputs[1:]):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale, shift = kernels.bn_scale_shift(gamma, beta, mean, var, float(node.attrs.get("epsilon", 1e-5)))
    dtype = params[0].dtype
    weight = scale.reshape(-1, 1, *[1] * rank).astype(dtype)
    return kernels.ConvParams.create(weight, shift.astype(dtype), group=len(scale))


class MergeParallelBranches(Pass):
    name = "merge-parallel-branches"
    summary = "sum parallel Conv/BN/identity branches over one input into a single Conv (RepVGG, skips)"

    def match(self, ctx: FoldContext):
        matches = []
        for node in ctx.graph.nodes:
            if node.op not in SUM_OPS or len(node.inputs) < 2 or len(node.outputs) != 1:
                continue
            sums, tensors = _flatten_sum(ctx, node)
            terms = [_term(ctx, t, owner) for t, owner in tensors if const_value(t) is None]
            constants = [const_value(t) for t, _ in tensors if const_value(t) is not None]
            # Two summands at least: one conv plus constants is fold-affine's business.
            if len(terms) >= 2 and any(t.node is not None and t.node.op == "Conv" for t in terms):
                matches.append(Match(tuple(sums) + tuple(t.node for t in terms if t.node is not None),
                                     {"terms": terms, "constants": constants, "sums": sums}))
        # Outermost sums first: a nested sum merges in one rewrite, and its inner sums are only
        # tried on their own when the whole is declined.
        return sorted(matches, key=lambda m: -len(m.data["sums"]))

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        terms: list[Term] = match.data["terms"]
        if len({id(t.source) for t in terms}) != 1:
            return Reject("branches read different tensors (a residual branch that is not one linear conv)")
        params = _term_params(ctx, terms)
        if isinstance(params, str):
            return Reject(params)
        # Everything up to the cost decision needs only the merged conv's shape: its weights,
        # the one heavy computation here, are summed only for a merge that will be made.
        try:
            shape_only = kernels.parallel_shape(params)
        except kernels.NotMergeable as exc:
            return Reject(str(exc))
        offset = self._constant_offset(ctx, match, shape_only)
        if isinstance(offset, str):
            return Reject(offset)
        map_offset = offset is not None and offset.ndim > 1
        reason = None if ctx.options.fold_all else self._cost_reason(ctx, match, terms, params, shape_only,
                                                                     map_offset)
        # With mixed groups the shape's group is a lower bound (the weights may show more groups).
        if reason and len({p.group for p in params}) == 1:
            return Reject(reason)
        try:
            merged = kernels.merge_parallel(params)
        except kernels.NotMergeable as exc:
            return Reject(str(exc))
        if reason and merged.group != shape_only.group:
            reason = self._cost_reason(ctx, match, terms, params, merged, map_offset)
        if reason:
            return Reject(reason)
        if offset is not None and not map_offset:
            # A per-channel constant is just more bias.
            merged = kernels.ConvParams(merged.weight, (merged.bias + offset).astype(merged.bias.dtype),
                                        merged.strides, merged.dilations, merged.pads, merged.group)
            offset = None
        return Exact(plan=BranchMerge(merged, offset))

    @staticmethod
    def _cost_reason(ctx: FoldContext, match: Match, terms: list[Term], params: list[kernels.ConvParams],
                     merged: kernels.ConvParams, map_offset: bool) -> str | None:
        """Why the merge would not pay, or None; ``merged`` need only have the merged conv's shape."""
        shape = ctx.concrete_shape(terms[0].source)
        out_shape = ctx.concrete_shape(match.anchor.outputs[0])
        # A constant-map Add (say a border correction) is there before and after; it cannot fuse.
        map_add = cost.elementwise_cost(out_shape, unfusable=True) if map_offset else 0.0
        before = sum(cost.conv_cost(p, shape) for t, p in zip(terms, params) if t.node is not None) + map_add
        before += (len(match.data["sums"]) - map_offset) * cost.elementwise_cost(out_shape)
        after = cost.conv_cost(merged, shape) + map_add
        if cost.pays(before, after):
            return None
        return f"merging does not pay ({cost.ratio_text(before, after)}); --fold-all merges anyway"

    @staticmethod
    def _constant_offset(ctx: FoldContext, match: Match, merged: kernels.ConvParams) -> np.ndarray | str | None:
        """The summed constant terms: a [M] vector (more bias), a map of rank 2 or more, or a reason."""
        constants = match.data["constants"]
        if not constants:
            return None
        try:
            total = sum(np.asarray(c, np.float64) for c in constants)
        except ValueError:
            return "constant terms do not broadcast together"
        if any(c.dtype != merged.weight.dtype for c in constants):
            return "constant terms have another dtype than the weights"
        # A constant that varies along channels only (and so cannot grow the sum) is more bias.
        channels_only = [None] * (merged.rank + 2)
        channels_only[1] = merged.out_channels
        if broadcast_keeps_shape(channels_only, total.shape):
            return np.broadcast_to(total.reshape(-1), (merged.out_channels,)).copy()
        # Anything else stays an Add after the merged conv, broadcasting the sum as it did before
        # (given 2 dims at least, so that it is not taken for a per-channel vector).
        return total.reshape((1,) * max(0, 2 - total.ndim) + total.shape)

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        add = match.anchor
        terms: list[Term] = match.data["terms"]
        merged, offset = decision.plan.merged, decision.plan.offset
        x, out = terms[0].source, add.outputs[0]
        removed = list(match.data["sums"]) + [t.node for t in terms if t.node is not None]
        detach(removed)
        dtype = merged.weight.dtype
        target = out
        if offset is not None:
            target = make_var(ctx.scope, f"{add.name}.merged", like=out)
            ctx.copy_shape(target, out)
        added = [make_conv(ctx.scope, f"{add.name}_merged", x, target, merged, dtype)]
        if offset is not None:
            offset_const = make_const(ctx.scope, f"{add.name}.offset", offset.astype(dtype))
            added.append(gs.Node("Add", ctx.scope.make(f"{add.name}_offset"), inputs=[target, offset_const],
                                 outputs=[out]))
        ctx.graph.nodes.extend(added)
        kinds = ", ".join("identity" if t.node is None else t.node.op for t in terms)
        size = "x".join(map(str, merged.kernel_shape))
        extra = " + constant Add" if offset is not None else ""
        return Change(removed, added, f"{len(terms)} branches ({kinds}) -> one {size} conv{extra}")



def _is_zero_layer(node: gs.Node | None) -> bool:
    if node is None or node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return False
    weight = float_const(node.inputs[1])
    if weight is None or np.any(weight):
        return False
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = float_const(node.inputs[2])
        return bias is not None and not np.any(bias)
    return True


def _kept_terms_fill(out_shape: tuple | None, kept: list[tuple | None]) -> bool:
    """True when the remaining summands alone broadcast to the sum's full shape.

    A symbolic dim passes only on the batch axis and only if a remaining summand carries it
    too: a residual branch never broadcasts its block's batch.
    """
    if out_shape is None or any(shape is None or len(shape) > len(out_shape) for shape in kept):
        return False
    rank = len(out_shape)
    for axis, size in enumerate(out_shape):
        dims = [shape[axis - rank + len(shape)] if axis - rank + len(shape) >= 0 else 1 for shape in kept]
        if size is None:
            if axis != 0 or None not in dims:
                return False
        elif size not in dims or any(d not in (1, size) for d in dims):
            return False
    return True


class DropZeroBranches(Pass):
    name = "drop-zero-branch"
    summary = "drop residual branches whose last layer has all-zero weights and bias"

    def moved_nodes(self, match: Match) -> tuple:
        return ()  # the branch's work is dropped, not moved

    def match(self, ctx: FoldContext):
        for node in ctx.graph.nodes:
            if node.op in SUM_OPS and len(node.inputs) >= 2 and len(node.outputs) == 1:
                zero = [i for i, t in enumerate(node.inputs) if _is_zero_layer(producer(t))]
                if zero:
                    yield Match((node,), {"zero": zero[0]})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        node, index = match.anchor, match.data["zero"]
        others = [t for i, t in enumerate(node.inputs) if i != index]
        if not _kept_terms_fill(ctx.static_shape(node.outputs[0]), [ctx.static_shape(t) for t in others]):
            return Reject("cannot prove the zero branch does not broadcast the sum to a larger shape")
        if len(others) == 1:
            reason = bypass_reason(node, others[0], node.outputs[0], ctx.graph_outputs)
            if reason:
                return Reject(reason)
        return Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node, index = match.anchor, match.data["zero"]
        zero = node.inputs[index]
        layer = producer(zero)
        others = [t for i, t in enumerate(node.inputs) if i != index]
        detail = f"dropped zero branch {layer.op} {layer.name!r} from {node.op} {node.name!r}"
        if len(others) == 1:
            bypass(node, others[0], node.outputs[0], ctx.graph_outputs)
            return Change([node], [], detail)
        # A Sum of the remaining summands replaces the node, so the change is recorded (an
        # in-place edit would look like no change to the engine).
        out = node.outputs[0]
        detach([node])
        smaller = gs.Node("Sum", ctx.scope.make(node.name), inputs=others, outputs=[out])
        ctx.graph.nodes.append(smaller)
        return Change([node], [smaller], detail)
