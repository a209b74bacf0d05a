"""The approximate stage: measured, budgeted rewrites on top of the exact pipeline.

Nothing here runs unless asked for. The model is first folded exactly; candidates (activations
with slopes near 1, epsilon-small and least-important residual branches, interior-exact conv
merges; see :mod:`graphfold.passes.approximate`) are then found on it and measured on the
calibration data. The output error is ``max|y' - y| / max|y|`` per output and batch, the same
number the final validation checks, against the *original* model.

Selection is greedy: candidates sorted by cost-model benefit per unit of error (each measured
alone), accepted in groups while the measured total error stays within the tolerance, a failing
group split in halves down to the candidate that breaks it. Ranked branch erasure then drops the
least important branches one by one. After the exact pipeline runs again (removals expose
merges), the result is validated on all the calibration data at the tolerance; if it fails,
bisection over the kept rewrites finds each offender, which is undone and reported.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import onnx
import onnx_graphsurgeon as gs

from graphfold.calibration import Calibration
from graphfold.engine import Approx, Decline, FoldContext, FoldOptions, Pass, Reject, Rewrite, decide
from graphfold.errors import UsageError
from graphfold.inputs import ShapeMap
from graphfold.measure import Measurer
from graphfold.options import DEFAULT_SELECTION_SAMPLES, ApproxOptions  # noqa: F401 (re-exported)
from graphfold.passes.approximate import DropEpsilonBranch, DropResidualBranch, MergeConvBorder, Residual, \
    SnapActivations, branch_nodes, find_residuals, learned_scales, node_cost
from graphfold.shapes import infer_concrete, infer_static
from graphfold.stats import depth
from graphfold.validate import ValidationResult, compare_models

log = logging.getLogger(__name__)

APPROXIMATE_PASSES = [SnapActivations.name, DropEpsilonBranch.name, DropResidualBranch.name, MergeConvBorder.name]
TINY_ERROR = 1e-12  # floor for benefit per unit of error, so error-free candidates rank first

ExactFold = Callable[[onnx.ModelProto], "tuple[onnx.ModelProto, list[Rewrite], list[Decline]]"]
Export = Callable[[gs.Graph, onnx.ModelProto], onnx.ModelProto]


@dataclass
class Candidate:
    """One approximate rewrite found on the exactly folded model, with what was measured."""

    pass_name: str
    key: tuple[str, ...]  # node names of its match, anchor first
    stage: int  # 1: on the exact fold of the original; 2: on the exact re-fold after stage 1
    benefit: float
    bound: float  # what the statistics alone say (max|F|, |1 - a| * max(-x)); inf when unknown
    importance: float | None = None
    error: float = math.inf  # measured output error with it (alone, or after the ranked drops before it)
    added: float = math.inf  # what it adds: ``error`` less the error measured without it

    @property
    def label(self) -> str:
        return f"{self.pass_name} {', '.join(self.key)}"


@dataclass
class Built:
    model: onnx.ModelProto
    approximate: list[Rewrite]
    exact: list[Rewrite]
    declines: list[Decline]


@dataclass
class ApproxOutcome:
    """What ``fold`` puts in the report."""

    model: onnx.ModelProto
    rewrites: list[Rewrite]
    declines: list[Decline]
    info: dict
    validation: ValidationResult | None = None  # on calibration data, when approximations were kept
    accuracy: dict | None = None


class ApproximateStage:
    """One run of the approximate stage over an exactly folded model."""

    def __init__(self, original: onnx.ModelProto, options: ApproxOptions, calibration: Calibration,
                 exact: ExactFold, export: Export, input_shapes: ShapeMap | None = None,
                 fold_all: bool = False, progress: Callable[[str], None] | None = None) -> None:
        self.original, self.options, self.calibration = original, options, calibration
        self.exact, self.export = exact, export
        self.input_shapes, self.fold_all, self.progress = input_shapes, fold_all, progress
        self.declines: list[Decline] = []
        self.rolled_back: list[dict] = []
        self.notes: list[str] = []
        self.passes: dict[str, Pass] = {}
        self._shapes: dict[tuple, tuple[dict, dict]] = {}

    # --- building models from a kept set ------------------------------------------------------

    def context(self, model: onnx.ModelProto, key: tuple) -> FoldContext:
        if key not in self._shapes:
            self._shapes[key] = (infer_static(model), infer_concrete(model, self.input_shapes))
        static, concrete = self._shapes[key]
        return FoldContext(gs.import_onnx(model), FoldOptions(fold_all=self.fold_all), static, concrete)

    def apply(self, model: onnx.ModelProto, candidates: Sequence[Candidate], key: tuple) -> tuple[onnx.ModelProto, list[Rewrite]]:
        """``model`` with ``candidates`` applied in order; those no longer found are skipped."""
        if not candidates:
            return model, []
        ctx = self.context(model, key)
        matches = {}
        for name in dict.fromkeys(c.pass_name for c in candidates):
            matches.update({(name, tuple(n.name for n in m.nodes)): m for m in self.passes[name].match(ctx)})
        applied = []
        for cand in candidates:
            match = matches.get((cand.pass_name, cand.key))
            alive = {id(n) for n in ctx.graph.nodes}
            if match is None or any(id(n) not in alive or not n.outputs for n in match.nodes):
                log.debug("skip %s: gone", cand.label)
                continue  # its nodes went with an earlier rewrite (a PRelu in a dropped branch)
            ctx.refresh()
            fold_pass = self.passes[cand.pass_name]
            decision = decide(ctx, fold_pass, match)
            if isinstance(decision, Reject):
                log.debug("skip %s: %s", cand.label, decision.reason)
                continue
            change = fold_pass.rewrite(ctx, match, decision)
            ctx.graph.cleanup()
            applied.append(Rewrite(cand.pass_name, [n.name for n in change.removed], [n.name for n in change.added],
                                   exact=False, error_bound=cand.added,
                                   detail=change.detail))
        ctx.graph.cleanup().toposort()
        return self.export(ctx.graph, model), applied

    def build(self, kept: Sequence[Candidate], refold: bool = True) -> Built:
        # Branch drops before activations: a PRelu inside a dropped branch then goes with it.
        first = sorted((c for c in kept if c.stage == 1), key=lambda c: c.pass_name == SnapActivations.name)
        second = [c for c in kept if c.stage == 2]
        model, approximate = self.apply(self.base, first, ("base",))
        exact, declines = [], []
        if refold or second:
            model, exact, declines = self.exact(model)
        if second:
            model, more = self.apply(model, second, _stage1_key(first))
            approximate += more
            if refold:
                model, again, declines = self.exact(model)
                exact += again
        return Built(model, approximate, exact, declines)

    # --- the stage ----------------------------------------------------------------------------

    def run(self) -> ApproxOutcome:
        options = self.options
        self.base, base_rewrites, base_declines = self.exact(self.original)
        info = {"tolerance": options.tolerance, "requested": options.requested, "passes": APPROXIMATE_PASSES}
        if not options.requested:
            if options.tolerance > 0:
                self.notes.append("--tolerance alone changes nothing: ask for --snap-slope, --epsilon, "
                                  "--drop-branches, --target-depth or --allow-border")
            return self._outcome(self.base, base_rewrites, base_declines, [], info, measurer=None)
        self._say("measuring on calibration data")
        measurer = Measurer(self.original, self.calibration, options.selection_samples)
        self.measurer = measurer
        self.base_error = measurer.error(self.base)
        info.update(selection_samples=min(options.selection_samples, self.calibration.samples),
                    base_error=self.base_error)
        pool, ranked = self._stage1_candidates()
        kept: list[Candidate] = []
        if options.tolerance <= 0:
            border = self._border_candidates(kept) if options.allow_border else []
            for cand in pool + ranked + border:
                statistic = f" (statistic {cand.bound:.3g})" if math.isfinite(cand.bound) else ""
                self._decline(cand, f"approximate{statistic}; --tolerance 0 allows exact rewrites only")
        else:
            self._measure_alone(pool, [])
            self._accept_greedy(pool, kept)
            self._drop_ranked(ranked, kept)
            if options.allow_border:
                border = self._border_candidates(kept)
                self._measure_alone(border, kept)
                self._accept_greedy(border, kept)
        built, validation = self._validated(kept)
        info.update(kept=len(kept), rolled_back=self.rolled_back,
                    measured_error=validation.max_rel if validation is not None else None)
        return self._outcome(built.model, base_rewrites + built.approximate + built.exact,
                             built.declines if kept else base_declines, kept, info, measurer, validation)

    def _outcome(self, model, rewrites, declines, kept, info, measurer, validation=None) -> ApproxOutcome:
        info["notes"] = self.notes
        accuracy = None
        if measurer is None and self.calibration is not None and self.calibration.labels is not None:
            measurer = Measurer(self.original, self.calibration, self.options.selection_samples)
        if measurer is not None and self.calibration.labels is not None:
            before = measurer.reference_accuracy()
            if before is None:
                self.notes.append("labels given, but the first output has no classes axis to score: no accuracy")
            else:
                accuracy = {"before": before, "after": measurer.accuracy(model), "samples": self.calibration.samples}
        return ApproxOutcome(model, rewrites, list(declines) + self.declines, info, validation, accuracy)

    def _stage1_candidates(self) -> tuple[list[Candidate], list[Candidate]]:
        options = self.options
        ctx = self.context(self.base, ("base",))
        residuals = find_residuals(ctx.graph)
        names = [r.add.inputs[r.branch].name for r in residuals] + [r.add.outputs[0].name for r in residuals]
        if options.snap_slope is not None:
            names += [n.inputs[0].name for n in ctx.graph.nodes if n.op in ("PRelu", "LeakyRelu", "Relu") and n.inputs]
        stats = self.measurer.statistics(self.base, names)
        pool: list[Candidate] = []
        if options.snap_slope is not None:
            self.passes[SnapActivations.name] = SnapActivations(stats, options.snap_slope)
            pool += self._candidates(ctx, SnapActivations.name, 1, lambda m, d: node_cost(ctx, m.anchor))
        branch_benefit = lambda m, d: _branch_benefit(ctx, m.data["residual"])  # noqa: E731
        if options.epsilon is not None:
            self.passes[DropEpsilonBranch.name] = DropEpsilonBranch(stats, options.epsilon)
            pool += self._candidates(ctx, DropEpsilonBranch.name, 1, branch_benefit)
        ranked: list[Candidate] = []
        if options.drop_branches or options.target_depth is not None:
            self.passes[DropResidualBranch.name] = DropResidualBranch(stats)
            taken = {c.key for c in pool if c.pass_name == DropEpsilonBranch.name}
            ranked = [c for c in self._candidates(ctx, DropResidualBranch.name, 1, branch_benefit) if c.key not in taken]
            scales = learned_scales(self.original)
            by_add = {(r.add.name,): r for r in residuals}
            use_scales = bool(ranked) and all(c.key[0] in scales for c in ranked)
            for cand in ranked:
                residual = by_add[cand.key]
                branch, out = stats[residual.add.inputs[residual.branch].name], stats[residual.add.outputs[0].name]
                cand.importance = scales[cand.key[0]] if use_scales else \
                    math.sqrt(branch.sum_squares / out.sum_squares) if out.sum_squares > 0 else math.inf
            ranked.sort(key=lambda c: c.importance)
            how = "learned branch scales" if use_scales else "measured contribution ||F|| / ||skip + F||"
            self.notes.append(f"branch importance from {how}")
        return pool, ranked

    def _candidates(self, ctx: FoldContext, name: str, stage: int, benefit) -> list[Candidate]:
        fold_pass = self.passes[name]
        found = []
        for match in fold_pass.match(ctx):
            decision = decide(ctx, fold_pass, match)
            key = tuple(n.name for n in match.nodes)
            if isinstance(decision, Reject):
                self.declines.append(Decline(name, list(key), decision.reason))
            elif isinstance(decision, Approx):
                found.append(Candidate(name, key, stage, benefit(match, decision), decision.bound))
        return found

    def _measure_alone(self, candidates: Sequence[Candidate], kept: Sequence[Candidate]) -> None:
        """Each candidate's output error with it alone applied (on top of ``kept``)."""
        reference = self._total(kept)
        for index, cand in enumerate(candidates, 1):
            self._say(f"measuring {index}/{len(candidates)}: {cand.label}")
            cand.error = self.measurer.error(self.build([*kept, cand], refold=False).model)
            cand.added = _added(cand.error, reference)

    def _accept_greedy(self, pool: list[Candidate], kept: list[Candidate]) -> None:
        """Accept candidates by benefit per unit of error while the total stays within tolerance."""
        tolerance = self.options.tolerance
        pool = sorted(pool, key=lambda c: (-c.benefit / max(c.added, TINY_ERROR), c.added))
        remaining = max(tolerance - self._total(kept), 0.0)
        viable = []
        for cand in pool:
            if cand.benefit <= 0 and not self.fold_all:
                self._decline(cand, "does not pay by the cost model")
            elif cand.error > tolerance:
                self._decline(cand, f"would add error {cand.added:.3g} > remaining tolerance {remaining:.3g} "
                                    f"(output error with it alone {cand.error:.3g} > --tolerance {tolerance:.3g})")
            else:
                viable.append(cand)

        def attempt(group: list[Candidate]) -> None:
            total = self.measurer.error(self.build([*kept, *group], refold=False).model)
            if total <= tolerance:
                kept.extend(group)
            elif len(group) == 1:
                self._decline(group[0], f"with the {len(kept)} rewrites kept before it the output error would be "
                                        f"{total:.3g} > --tolerance {tolerance:.3g} (it alone adds "
                                        f"{group[0].added:.3g})")
            else:
                attempt(group[:len(group) // 2])
                attempt(group[len(group) // 2:])

        if viable:
            attempt(viable)

    def _total(self, kept: Sequence[Candidate]) -> float:
        return self.measurer.error(self.build(kept, refold=False).model) if kept else self.base_error

    def _drop_ranked(self, ranked: list[Candidate], kept: list[Candidate]) -> None:
        """Network Implosion: drop the least important branches, one by one, within tolerance."""
        options, tolerance = self.options, self.options.tolerance
        dropped, before = 0, self._total(kept)
        for cand in ranked:
            current = depth(self.build(kept).model.graph) if options.target_depth is not None else None
            if dropped >= options.drop_branches and (current is None or current <= options.target_depth):
                break
            total = self.measurer.error(self.build([*kept, cand], refold=False).model)
            cand.error, cand.added = total, _added(total, before)
            if total <= tolerance:
                kept.append(cand)
                dropped, before = dropped + 1, total
            else:
                self._decline(cand, f"importance {cand.importance:.3g}: would add error {cand.added:.3g} > "
                                    f"remaining tolerance {max(tolerance - before, 0.0):.3g}")
        if dropped < options.drop_branches:
            self.notes.append(f"--drop-branches {options.drop_branches}: dropped {dropped}; the other branches "
                              "would break the tolerance")
        if options.target_depth is not None:
            reached = depth(self.build(kept).model.graph)
            if reached > options.target_depth:
                self.notes.append(f"--target-depth {options.target_depth} not reached: depth {reached}; dropping "
                                  "more branches would break the tolerance")

    def _border_candidates(self, kept: list[Candidate]) -> list[Candidate]:
        first = [c for c in kept if c.stage == 1]
        model = self.build(first).model
        ctx = self.context(model, _stage1_key(first))
        self.passes[MergeConvBorder.name] = MergeConvBorder()
        found = self._candidates(ctx, MergeConvBorder.name, 2, lambda m, d: d.plan.benefit)
        # One merge per conv: overlapping pairs (a, b), (b, c) cannot both apply.
        used, disjoint = set(), []
        for cand in found:
            if not used & set(cand.key):
                used.update(cand.key)
                disjoint.append(cand)
        return disjoint

    def _validated(self, kept: list[Candidate]) -> tuple[Built, ValidationResult | None]:
        """The final model, validated on all calibration data; offenders found by bisection and undone."""
        while kept:
            built = self.build(kept)
            result = self._validate(built.model)
            if result.passed:
                return built, result
            # The shortest failing prefix ends with an offender (the empty prefix passes).
            low, high = 0, len(kept)
            while high - low > 1:
                middle = (low + high) // 2
                if self.measurer.error(self.build(kept[:middle]).model, full=True) <= self.options.tolerance:
                    low = middle
                else:
                    high = middle
            offender = kept.pop(high - 1)
            error = self.measurer.error(self.build([*kept[:high - 1], offender]).model, full=True)
            reason = (f"rolled back: on all {self.calibration.samples} calibration samples the output error with it "
                      f"is {error:.3g} > --tolerance {self.options.tolerance:.3g} (the selection measured "
                      f"{offender.error:.3g})")
            self.rolled_back.append({"pass": offender.pass_name, "nodes": list(offender.key), "reason": reason})
            self.declines.append(Decline(offender.pass_name, list(offender.key), reason))
        return Built(self.base, [], [], []), None

    def _validate(self, model: onnx.ModelProto) -> ValidationResult:
        self._say("validating on calibration data")
        return compare_models(self.original, model, feeds=self.calibration.batches(), rtol=self.options.tolerance,
                              atol=0.0)

    def _decline(self, cand: Candidate, reason: str) -> None:
        self.declines.append(Decline(cand.pass_name, list(cand.key), reason))

    def _say(self, text: str) -> None:
        if self.progress:
            self.progress(text)


def _stage1_key(first: Sequence[Candidate]) -> tuple:
    """Names the model stage 2 works on: the exact re-fold of the base with ``first`` applied."""
    return ("stage1",) + tuple(sorted(c.key for c in first))


def _added(error: float, without: float) -> float:
    """The error a rewrite adds over ``without``: never negative, inf when it breaks the model."""
    return math.inf if math.isinf(error) else max(error - without, 0.0)


def _branch_benefit(ctx: FoldContext, residual: Residual) -> float:
    dead = branch_nodes(ctx.graph, residual, ctx.graph_outputs)
    return node_cost(ctx, residual.add) + sum(node_cost(ctx, n) for n in dead)
