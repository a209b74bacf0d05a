"""The pass engine: match / check / rewrite passes run to a fixed point, every rewrite recorded.

A pass finds candidates (``match``), decides for each whether it may fire (``check`` returns
``Exact``, ``Approx(bound)`` or ``Reject(reason)`` and never mutates), and builds the
replacement (``rewrite``, which never declines). The engine runs an explicit ordered list
of passes until a whole round changes nothing, records each rewrite and, for
``graphfold inspect``, each decline with its reason.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, Union

import onnx_graphsurgeon as gs

from graphfold import fusions
from graphfold.graph import NameScope, node_label, release_dead

log = logging.getLogger(__name__)

Shape = tuple  # of int | None


@dataclass(frozen=True)
class Exact:
    """The rewrite leaves outputs equal up to float rounding.

    ``plan`` is what ``check`` worked out to reach its verdict (merged weights, a split of a
    chain) and hands to ``rewrite``, so the work is done once and ``check`` stays pure.
    """

    plan: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Approx:
    """The rewrite changes outputs by at most ``bound`` (absolute, on the data it was measured on)."""

    bound: float
    how: str = "measured"
    plan: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Reject:
    """The rewrite may not fire here, and why (shown by ``graphfold inspect``)."""

    reason: str


Decision = Union[Exact, Approx, Reject]


@dataclass
class Match:
    """A candidate: the nodes it would replace (first is the anchor) and pass-specific data."""

    nodes: tuple[gs.Node, ...]
    data: dict = field(default_factory=dict)

    @property
    def anchor(self) -> gs.Node:
        return self.nodes[0]


@dataclass
class Change:
    """What ``rewrite`` did: nodes taken out, nodes put in, and a short description."""

    removed: Sequence[gs.Node]
    added: Sequence[gs.Node]
    detail: str = ""
    count: int = 1  # rewrites it stands for: constant folding folds many nodes in one graphsurgeon call


@dataclass
class Rewrite:
    """One applied rewrite, as the report shows it."""

    pass_name: str
    nodes_removed: list[str]
    nodes_added: list[str]
    exact: bool
    error_bound: float | None = None
    detail: str = ""
    count: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decline:
    """One candidate a pass looked at and left alone."""

    pass_name: str
    nodes: list[str]
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def strict_from_env() -> bool:
    """``GRAPHFOLD_STRICT=1`` (the test suite sets it) makes a failing ``check`` an error."""
    return os.environ.get("GRAPHFOLD_STRICT", "") not in ("", "0")


@dataclass
class FoldOptions:
    fold_all: bool = False  # every exact merge, even where the cost model says it does not pay
    max_rounds: int = 8
    # A ``check`` that raises is a bug in graphfold. Strict: it stops the fold (PassError).
    # Otherwise: the candidate is declined, with a warning, and the rest of the model still folds.
    strict: bool = field(default_factory=strict_from_env)


class FoldContext:
    """What a pass sees: the graph, shapes, options, a name scope and the decline log."""

    def __init__(self, graph: gs.Graph, options: FoldOptions | None = None,
                 static_shapes: Mapping[str, Shape] | None = None,
                 concrete_shapes: Mapping[str, Shape] | None = None) -> None:
        self.graph = graph
        self.options = options or FoldOptions()
        # static: dims as the model fixes them (None where symbolic) -- decides exactness.
        # concrete: dims with symbolic ones resolved -- only for costs.
        self.static_shapes: dict[str, Shape] = dict(static_shapes or {})
        self.concrete_shapes: dict[str, Shape] = dict(concrete_shapes or {})
        self.scope = NameScope(graph)
        self.declines: list[Decline] = []
        # No pass creates an If/Loop/Scan, so a graph without one never needs its bodies walked:
        # ``refresh`` runs after every rewrite.
        self._has_subgraphs = any(isinstance(attr, gs.Graph) for node in graph.nodes for attr in node.attrs.values())
        self.refresh()

    def refresh(self) -> None:
        """Recompute per-graph facts that rewrites may change."""
        # Tensors that an If/Loop/Scan body returns, or that a node in a body alone reads, must
        # survive like graph outputs: no rewrite may fuse this graph's nodes with a body's.
        self.graph_outputs = {t.name for t in self.graph.outputs}
        if self._has_subgraphs:
            self.graph_outputs |= subgraph_reads(self.graph)

    def broken_fusion(self, nodes: Iterable[gs.Node]) -> fusions.Fusion | None:
        """The runtime fusion (``graphfold.fusions``) that rewriting ``nodes`` away would break."""
        return fusions.broken_fusion(nodes, self.graph_outputs, self.static_shape)

    def static_shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.static_shapes.get(tensor.name)

    def static_spatial(self, tensor: gs.Tensor) -> Shape | None:
        """The spatial dims of an [N, C, *spatial] tensor as the model fixes them (None if unknown)."""
        shape = self.static_shape(tensor)
        return tuple(shape[2:]) if shape is not None and len(shape) > 2 else None

    def concrete_shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.concrete_shapes.get(tensor.name) or self.static_shape(tensor)

    def copy_shape(self, dst: gs.Tensor, src: gs.Tensor) -> None:
        """Give a tensor made by a rewrite the shapes of the tensor it stands for."""
        for table in (self.static_shapes, self.concrete_shapes):
            if src.name in table:
                table[dst.name] = table[src.name]

    def set_shape(self, tensor: gs.Tensor, static: Shape | None, concrete: Shape | None = None) -> None:
        if static is not None:
            self.static_shapes[tensor.name] = tuple(static)
        if concrete is not None or static is not None:
            self.concrete_shapes[tensor.name] = tuple(concrete if concrete is not None else static)


def subgraph_reads(graph: gs.Graph) -> set[str]:
    """Names of the tensors that the graph's subgraphs (nested ones included) return, or that a
    node inside them is the only reader of."""
    names: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                names.update(t.name for t in attr.outputs)
                for inner in attr.nodes:
                    names.update(t.name for t in inner.inputs if len(t.outputs) == 1)
                names.update(subgraph_reads(attr))
    return names


class Pass:
    """A rewrite family. Subclasses set ``name`` and ``summary`` and implement the three steps."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def match(self, ctx: FoldContext) -> Iterable[Match]:
        raise NotImplementedError

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        raise NotImplementedError

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        raise NotImplementedError

    def moved_nodes(self, match: Match) -> Sequence[gs.Node]:
        """The nodes whose work the rewrite moves into other nodes; a runtime fusion they belong
        to must survive. A pass that deletes work outright (an identity, a zero branch) moves none."""
        return match.nodes


Progress = Callable[[str], None]

MAX_SWEEPS = 64


class PassError(RuntimeError):
    """A rewrite raised (or a check, in strict mode): a bug in graphfold, reported with the pass's name."""


def decide(ctx: FoldContext, fold_pass: Pass, match: Match) -> Decision:
    """``fold_pass.check`` on ``match``; an exception in it is an error when strict, else a decline."""
    try:
        return fold_pass.check(ctx, match)
    except Exception as exc:
        if ctx.options.strict:
            raise
        # check never mutates, so declining is safe; the warning keeps the bug visible.
        log.warning("%s: check raised on %s, declined (%s: %s)", fold_pass.name,
                    [n.name for n in match.nodes], type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return Reject(f"could not analyse ({type(exc).__name__}: {exc})")


def run_pass(ctx: FoldContext, fold_pass: Pass) -> list[Rewrite]:
    """One sweep of ``fold_pass`` over the graph; returns the rewrites it made."""
    ctx.refresh()
    gone: set[int] = set()
    rewrites = []
    for match in list(fold_pass.match(ctx)):
        # An earlier rewrite in this sweep may have consumed part of this candidate.
        if any(id(node) in gone for node in match.nodes):
            continue
        decision = decide(ctx, fold_pass, match)
        if not isinstance(decision, Reject):
            fusion = ctx.broken_fusion(fold_pass.moved_nodes(match))
            if fusion is not None:
                decision = Reject(fusions.describe(fusion))
        if isinstance(decision, Reject):
            ctx.declines.append(Decline(fold_pass.name, [node_label(ctx.graph, n) for n in match.nodes],
                                       decision.reason))
            continue
        # Inputs of the replaced nodes, whose weights may be let go after the rewrite.
        read = [] if ctx._has_subgraphs else [t for node in match.nodes for t in node.inputs]
        change = fold_pass.rewrite(ctx, match, decision)
        if not change.removed and not change.added:
            # rewrite never declines: whatever could stop it belongs in check.
            raise PassError(f"pass {fold_pass.name!r} accepted {[n.name for n in match.nodes]} but changed nothing")
        gone.update(id(node) for node in change.removed)
        release_dead(read, ctx.graph_outputs)
        ctx.refresh()
        rewrites.append(Rewrite(
            pass_name=fold_pass.name,
            nodes_removed=[n.name for n in change.removed],
            nodes_added=[n.name for n in change.added],
            exact=isinstance(decision, Exact),
            error_bound=decision.bound if isinstance(decision, Approx) else None,
            detail=change.detail,
            count=change.count,
        ))
        log.debug("%s: %s", fold_pass.name, change.detail)
    if rewrites:
        ctx.graph.cleanup()
    return rewrites


def run_pipeline(ctx: FoldContext, passes: Sequence[Pass], progress: Progress | None = None) -> list[Rewrite]:
    """Run ``passes`` in order, round after round, until a round changes nothing."""
    applied: list[Rewrite] = []
    for round_index in range(1, ctx.options.max_rounds + 1):
        # Declines are re-collected each round so the last round's list is the final state.
        ctx.declines.clear()
        changed = 0
        for fold_pass in passes:
            if progress:
                progress(f"round {round_index}: {fold_pass.name}")
            # Each pass runs to its own fixed point: a rewrite can expose a candidate just past it
            # (a constant map sunk through one conv meets the next), which the same sweep missed.
            for _ in range(MAX_SWEEPS):
                try:
                    done = run_pass(ctx, fold_pass)
                except PassError:
                    raise
                except Exception as exc:
                    raise PassError(f"pass {fold_pass.name!r} failed: {type(exc).__name__}: {exc}") from exc
                applied.extend(done)
                changed += len(done)
                if not done:
                    break
        if not changed:
            break
    else:
        log.info("stopped after %d rounds without reaching a fixed point", ctx.options.max_rounds)
    ctx.graph.cleanup().toposort()
    return applied
