"""Merge chains of linear Convs into single Convs where the composition is exact.

``conv2(conv1(x)) = conv(x)`` with extent ``E1 + (E2 - 1) * s1``, stride ``s1 * s2`` and bias
``b2 + sum(W2 * b1)`` (see ``kernels.compose``). It is exact everywhere when conv2 has no
padding, and when conv1 is a pointwise conv without padding: then only conv1's bias leaks
into conv2's zero border, a constant map added back as ``Add(C)`` when spatial dims are
static (a plain Conv when the bias is zero). A padded kxk after a kxk is exact only in the
interior and is never merged here.

A chain is a maximal run of Convs whose intermediates have one consumer. The pass picks the
split of the chain into merged segments that the cost model rates cheapest (with
``--fold-all``: the fewest Convs), so an expand-depthwise-project block merges as a whole even
though no pair of it pays alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphfold import cost, kernels
from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import conv_params, detach, is_shared, make_const, make_conv, make_var, single_use_reason, \
    sole_consumer


@dataclass
class Segment:
    """Convs ``start..stop-1`` of a chain merged into ``params`` (+ a constant map ``correction``)."""

    start: int
    stop: int
    params: kernels.ConvParams
    correction: np.ndarray | None
    cost: float


def _link(ctx: FoldContext, node: gs.Node) -> gs.Node | None:
    """The Conv that alone reads ``node``'s output, if any."""
    nxt = sole_consumer(node.outputs[0], ctx.graph_outputs)
    if nxt is not None and nxt.op == "Conv" and nxt.inputs[0] is node.outputs[0]:
        return nxt
    return None


def _blocked_link(ctx: FoldContext, node: gs.Node) -> tuple[gs.Node, gs.Node] | None:
    """(node, a Conv reading its output) when that output has other readers or is a graph output."""
    out = node.outputs[0]
    if single_use_reason(out, ctx.graph_outputs) is None:
        return None
    nxt = next((n for n in out.outputs if n.op == "Conv" and n.inputs[0] is out), None)
    return (node, nxt) if nxt is not None else None


def conv_reason(ctx: FoldContext, node: gs.Node) -> str | None:
    """Why a Conv cannot take part in a merge (None if it can)."""
    if conv_params(node, ctx.static_spatial(node.inputs[0])) is None:
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return f"Conv {node.name!r} uses auto_pad and its input's spatial dims are dynamic"
        return f"Conv {node.name!r} weights are not float constants"
    if any(is_shared(t, node) for t in node.inputs[1:] if t.name):
        return f"Conv {node.name!r} weight is shared with another node"
    return None



def compose_exact(ctx: FoldContext, state: Segment, nxt: kernels.ConvParams,
                  in_tensor: gs.Tensor) -> Segment | str:
    """``state`` extended by one more conv, or the reason that would not be exact. The segment's
    params are the merged conv's shape and bias (``kernels.compose_shape``): its weights are
    composed only for the segments a split keeps (``compose_weights``)."""
    try:
        return _compose_exact(ctx, state, nxt, in_tensor)
    except kernels.NotMergeable as exc:
        return str(exc)


def _compose_exact(ctx: FoldContext, state: Segment, nxt: kernels.ConvParams,
                   in_tensor: gs.Tensor) -> Segment | str:
    params, correction = state.params, state.correction
    if params.weight.dtype != nxt.weight.dtype:
        return "the convs' weights have different dtypes"
    if not any(nxt.pads):
        merged = kernels.compose_shape(params, nxt)
        if correction is not None:
            correction = kernels.conv_reference(correction, _no_bias(nxt)).astype(correction.dtype)
        return Segment(state.start, state.stop + 1, merged, correction, 0.0)
    if not params.is_pointwise or any(params.pads) or correction is not None:
        return (f"padded {_kernel_text(nxt)} conv after a {_kernel_text(params)} conv is exact only in the "
                "interior (intermediate zero padding); move the padding to the chain's first conv")
    spatial = ctx.static_spatial(in_tensor)
    merged = kernels.compose_shape(params, nxt)
    if np.any(params.bias):
        if spatial is None or any(d is None for d in spatial):
            return ("pointwise conv bias leaks into the next conv's zero padding and the spatial dims are "
                    "dynamic, so the constant border correction cannot be built")
        correction = kernels.border_correction(params, nxt, spatial)
        if not np.any(correction):
            correction = None
    return Segment(state.start, state.stop + 1, merged, correction, 0.0)


def compose_weights(segments: list[Segment], params: list[kernels.ConvParams]) -> list[Segment]:
    """The kept segments with their merged convs' weights, composed in the order the split
    composed their shapes. Raises ``NotMergeable`` (a float16 product that overflows)."""
    done = []
    for seg in segments:
        if seg.stop - seg.start > 1:
            merged = params[seg.start]
            for nxt in params[seg.start + 1:seg.stop]:
                merged = kernels.compose(merged, nxt)
            seg = Segment(seg.start, seg.stop, merged, seg.correction, seg.cost)
        done.append(seg)
    return done


def _no_bias(p: kernels.ConvParams) -> kernels.ConvParams:
    return kernels.ConvParams(p.weight, np.zeros_like(p.bias), p.strides, p.dilations, p.pads, p.group)


def _kernel_text(p: kernels.ConvParams) -> str:
    return "x".join(str(e) for e in p.extent)


class MergeConvChains(Pass):
    name = "merge-conv-chain"
    summary = "merge sequential linear Convs (kxk->1x1, unpadded second, 1x1->padded kxk) into one Conv"

    def match(self, ctx: FoldContext):
        convs = [n for n in ctx.graph.nodes if n.op == "Conv" and n.outputs]
        followers = {}
        for node in convs:
            nxt = _link(ctx, node)
            if nxt is not None:
                followers[id(node)] = nxt
        starts = set(followers) - {id(n) for n in followers.values()}
        for node in convs:
            if id(node) in starts:
                chain = [node]
                while id(chain[-1]) in followers:
                    chain.append(followers[id(chain[-1])])
                yield Match(tuple(chain))
            elif id(node) not in followers:
                # A Conv -> Conv link that must keep its intermediate: declined, so inspect says why.
                blocked = _blocked_link(ctx, node)
                if blocked is not None:
                    yield Match(blocked, {"blocked": single_use_reason(node.outputs[0], ctx.graph_outputs)})

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        if "blocked" in match.data:
            return Reject(match.data["blocked"])
        chain = match.nodes
        # A Conv that may not take part splits the chain; the parts around it may still merge.
        reasons = [conv_reason(ctx, node) for node in chain]
        params = [None if reason else conv_params(n, ctx.static_spatial(n.inputs[0])) for n, reason in zip(chain, reasons)]
        singles = [0.0 if p is None else cost.conv_cost(p, ctx.concrete_shape(n.inputs[0]))
                   for p, n in zip(params, chain)]
        best, why = self._best_split(ctx, chain, params, singles)
        if all(seg.stop - seg.start == 1 for seg in best):
            return Reject(next((reason for reason in reasons if reason), why))
        try:
            return Exact(plan=compose_weights(best, params))
        except kernels.NotMergeable as exc:
            return Reject(str(exc))

    def _best_split(self, ctx: FoldContext, chain, params, singles) -> tuple[list[Segment], str]:
        """Dynamic programme over split points: cheapest (or, with fold_all, fewest-conv) cover.
        Costs come from the merged convs' shapes; no weights are composed here."""
        n = len(chain)
        options: dict[tuple[int, int], Segment] = {}
        why = ""
        for start in range(n):
            state = Segment(start, start + 1, params[start], None, singles[start])
            options[(start, start + 1)] = state
            for stop in range(start + 2, n + 1):
                if params[start] is None or params[stop - 1] is None:
                    break
                nxt = compose_exact(ctx, state, params[stop - 1], chain[start].inputs[0])
                if isinstance(nxt, str):
                    why = why or nxt
                    break
                nxt.cost = cost.conv_cost(nxt.params, ctx.concrete_shape(chain[start].inputs[0]))
                if nxt.correction is not None:
                    nxt.cost += cost.elementwise_cost(ctx.concrete_shape(chain[stop - 1].outputs[0]),
                                                      unfusable=True)
                options[(start, stop)] = state = nxt
        fold_all = ctx.options.fold_all

        def key(segs: list[Segment]) -> tuple:
            total = sum(s.cost for s in segs)
            return (len(segs), total) if fold_all else (total, len(segs))

        best: list[list[Segment]] = [[]] + [None] * n
        for stop in range(1, n + 1):
            candidates = [best[start] + [options[(start, stop)]] for start in range(stop)
                          if (start, stop) in options]
            best[stop] = min(candidates, key=key)
        if not why:
            total_single = sum(singles)
            merged_all = options.get((0, n))
            ratio = cost.ratio_text(total_single, merged_all.cost) if merged_all else ""
            why = f"merging does not pay ({ratio}); --fold-all merges anyway"
        return best[n], why

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        chain = match.nodes
        removed, added, parts = [], [], []
        segments: list[Segment] = decision.plan
        for seg in segments:
            if seg.stop - seg.start == 1:
                continue
            first, last = chain[seg.start], chain[seg.stop - 1]
            x, out = first.inputs[0], last.outputs[0]
            dtype = seg.params.weight.dtype
            merged_nodes = list(chain[seg.start:seg.stop])
            detach(merged_nodes)
            target = out
            if seg.correction is not None:
                target = make_var(ctx.scope, f"{last.name}.merged", like=out)
                ctx.copy_shape(target, out)
            conv = make_conv(ctx.scope, f"{first.name}_merged", x, target, seg.params, dtype)
            new = [conv]
            if seg.correction is not None:
                border = make_const(ctx.scope, f"{last.name}.border", seg.correction.astype(dtype))
                new.append(gs.Node("Add", ctx.scope.make(f"{last.name}_border"), inputs=[target, border],
                                   outputs=[out]))
            ctx.graph.nodes.extend(new)
            removed.extend(merged_nodes)
            added.extend(new)
            parts.append(f"{len(merged_nodes)} convs -> {_kernel_text(seg.params)} conv"
                         + (" + border Add" if seg.correction is not None else ""))
        return Change(removed, added, "; ".join(parts))
