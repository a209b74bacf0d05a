"""The refit stage: candidates found, fitted, measured on the holdout, accepted greedily, validated.

Calibration samples are split once (seeded) into a *fit* part, the only data any weight is fitted
on, and a *holdout*, the only data any decision is made on: candidate damage, the budgets, and the
final validation. Fits read the input of a region from the current (already compressed) model and
the target from the exactly folded original (equal to the original up to float rounding), by
tensor name.

Selection is lazy greedy: every candidate is measured once on the exact fold; then the best by
cost-model saving per unit of damage (the increase of the relative logit error
``||y' - y|| / ||y||`` on the holdout) is re-measured on the current model, and accepted when it
is still the best and the budgets hold (accuracy drop, agreement with the original's top-1, and
``--tolerance`` on ``max|y' - y| / max|y|`` when given). After an acceptance, convs fitted earlier
downstream of it are refit on the new prefix (a cascade), kept where that helps on the holdout.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from graphfold.calibration import Calibration
from graphfold.engine import Decline, FoldContext, FoldOptions, Rewrite
from graphfold.errors import UsageError
from graphfold.inputs import ShapeMap
from graphfold.passes.approximate import node_cost
from graphfold.refit import MIN_HOLDOUT, RefitOptions
from graphfold.refit.activations import Session, collect
from graphfold.refit.fit import ConvFit, FitResult
from graphfold.refit.holdout import Metrics, Part, evaluate
from graphfold.refit.regions import conv_geometry, conv_node, cuts, describe, drop_unused_initializers, \
    erase_reason, find_region, linearize_reason, region_geometry, regions, replace_region, unique_name
from graphfold.shapes import infer_concrete, infer_static
from graphfold.stats import depth
from graphfold.validate import OutputError, ValidationResult

log = logging.getLogger(__name__)

LINEARIZE, ERASE = "refit-linearize", "refit-erase"
PASSES = (LINEARIZE, ERASE)
DAMAGE_FLOOR = 1e-3  # relative logit error below which damage counts as this much (ranking only)
FIT_FLOPS = 6e8  # per fit: caps the patch rows of X^T X so one fit stays near a second
MIN_ROWS_PER_FEATURE = 12
DYNAMIC_BATCH = 64

ExactFold = Callable[[onnx.ModelProto], "tuple[onnx.ModelProto, list[Rewrite], list[Decline]]"]


class Skip(Exception):
    """A candidate that cannot apply to the current model, with the reason."""


@dataclass
class Candidate:
    kind: str  # LINEARIZE or ERASE
    source: str
    target: str
    label: str
    status: str = "pending"  # pending, accepted, rejected, rolled back
    reason: str = ""
    generation: int = -1  # of the model it was last measured on
    benefit: float = math.nan  # cost-model saving over the model it was measured on
    saving: float = math.nan  # the same as a share of the exact fold's cost
    residual: float = math.nan  # worst fit residual ||XW - Y|| / ||Y - mean Y|| of its fits
    damage: float = math.nan
    metrics: Metrics | None = None
    model: onnx.ModelProto | None = None
    fitted: list[str] = field(default_factory=list)  # output tensors of the convs it fitted

    @property
    def score(self) -> float:
        if self.metrics is None or not self.benefit > 0:
            return -math.inf
        return self.benefit / max(self.damage, DAMAGE_FLOOR)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "target": self.target, "status": self.status,
                "reason": self.reason, "cost_saving": self.saving, "fit_residual": self.residual,
                "damage": self.damage, "holdout": self.metrics.to_dict() if self.metrics else None}


@dataclass
class RefitOutcome:
    model: onnx.ModelProto
    rewrites: list[Rewrite]
    declines: list[Decline]
    info: dict
    validation: ValidationResult
    accuracy: dict | None


class RefitStage:
    def __init__(self, original: onnx.ModelProto, base: onnx.ModelProto, calibration: Calibration,
                 options: RefitOptions, exact: ExactFold, tolerance: float = 0.0, target_depth: int | None = None,
                 input_shapes: ShapeMap | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.original, self.base, self.calibration, self.options = original, base, calibration, options
        self.exact, self.tolerance, self.target_depth = exact, tolerance, target_depth
        self.input_shapes, self.progress = input_shapes, progress
        self.notes: list[str] = []
        self.fit_seconds = 0.0
        self._base_cache: dict[str, list[np.ndarray]] = {}
        self._current_cache: dict[str, list[np.ndarray]] = {}
        self._costs: dict[int, tuple] = {}
        self._grams: dict[tuple, np.ndarray] = {}
        self.base_tensors = {o for n in base.graph.node for o in n.output} | {vi.name for vi in base.graph.input}
        self.fit_part, self.holdout = self._split()
        self.agreement_floor = options.agreement_floor()

    # --- data ------------------------------------------------------------------------------------

    def _split(self) -> tuple[Part, Part]:
        data, options = self.calibration, self.options
        if data.is_random:
            raise UsageError("--refit needs real inputs: give --calibration FILE.npz (random inputs would fit "
                             "the network to noise)")
        total = data.samples
        held = int(round(total * options.holdout))
        if held < MIN_HOLDOUT or total - held < MIN_HOLDOUT:
            raise UsageError(f"--holdout {options.holdout:g} of {total} calibration samples leaves {held} held out "
                             f"and {total - held} to fit on; each needs at least {MIN_HOLDOUT}")
        if options.max_accuracy_drop is not None and data.labels is None:
            raise UsageError("--max-accuracy-drop needs --labels (or a 'labels' array in the calibration file)")
        order = np.random.default_rng(options.seed).permutation(total)
        dims = [vi.type.tensor_type.shape.dim for vi in self.original.graph.input if vi.name in data.arrays]
        fixed = any(d and d[0].HasField("dim_value") and d[0].dim_value > 0 for d in dims)
        batch = data.batch_size if fixed else DYNAMIC_BATCH
        holdout, fit = np.sort(order[:held]), np.sort(order[held:])
        if fixed:
            holdout, fit = holdout[:len(holdout) - len(holdout) % batch], fit[:len(fit) - len(fit) % batch]
            if len(holdout) < MIN_HOLDOUT or not len(fit):
                raise UsageError(f"the model fixes its batch at {batch}: too few whole batches of calibration "
                                 f"samples for a holdout of {MIN_HOLDOUT}")
        reference = Session(self.original)
        return Part(data, fit, batch, reference), Part(data, holdout, batch, reference)

    def _base_acts(self, name: str) -> list[np.ndarray]:
        if name not in self._base_cache:
            self._base_cache.update(collect(self.base, [name], self.fit_part.batches))
        return self._base_cache[name]

    def _acts(self, model: onnx.ModelProto, names: Sequence[str]) -> dict[str, list[np.ndarray]]:
        """Activations of ``model`` on the fit part; cached for the current model."""
        if model is not self.current:
            return collect(model, list(names), self.fit_part.batches)
        missing = [n for n in names if n not in self._current_cache]
        if missing:
            self._current_cache.update(collect(model, missing, self.fit_part.batches))
        return {n: self._current_cache[n] for n in names}

    # --- building candidates -----------------------------------------------------------------------

    def structure(self, model: onnx.ModelProto, cand: Candidate) -> tuple[onnx.ModelProto, list[str]]:
        """The candidate's rewrite with placeholder weights, and the conv outputs to fit (in order)."""
        graph = model.graph
        region = find_region(graph, cand.source, cand.target)
        if region is None:
            raise Skip("no longer a single-input single-output region (an accepted rewrite overlaps it)")
        shapes = self._shapes(model)
        if cand.kind == LINEARIZE:
            reason = linearize_reason(graph, region, shapes)
            if reason:
                raise Skip(f"the region {reason}")
            geometry = region_geometry(region, shapes)
            kh, kw = geometry.kernel
            weight = numpy_helper.from_array(np.zeros((geometry.out_channels, geometry.in_channels, kh, kw),
                                                      np.float32), unique_name(graph, f"{cand.target}_refit_w"))
            bias = numpy_helper.from_array(np.zeros(geometry.out_channels, np.float32),
                                           unique_name(graph, f"{cand.target}_refit_b"))
            node = conv_node(unique_name(graph, f"refit_{cand.target}"), cand.source, cand.target, weight.name,
                             bias.name, geometry.kernel, geometry.strides, geometry.pads)
            return replace_region(model, region, [node], [weight, bias]), [cand.target]
        reason = erase_reason(graph, region, shapes)
        if reason:
            raise Skip(f"the region {reason}")
        node = helper.make_node("Identity", [cand.source], [cand.target], name=unique_name(graph, f"erased_{cand.target}"))
        erased = replace_region(model, region, [node])
        return erased, self._next_convs(erased, cand.target)

    def _next_convs(self, model: onnx.ModelProto, tensor: str) -> list[str]:
        """Outputs of the convs in the first region after ``tensor`` that holds any (compensation)."""
        all_cuts = cuts(model.graph)
        positions = [i for i, c in enumerate(all_cuts) if c.tensor == tensor]
        if not positions:
            return []
        first = all_cuts[positions[0]]
        for last in all_cuts[positions[0] + 1:]:
            region = describe(model.graph, first, last)
            if region is None:
                return []
            if region.convs:
                nodes = model.graph.node[region.start:region.stop + 1]
                return [n.output[0] for n in nodes if n.op_type == "Conv"]
        return []

    def fit_conv(self, model: onnx.ModelProto, output: str,
                 same_prefix: bool = False) -> tuple[onnx.ModelProto, FitResult]:
        """``model`` with the conv writing ``output`` refit: input from ``model``, target from the original.

        A conv whose only consumer is an Add (a residual branch's last conv) is fitted so that the Add
        reproduces the original's sum: target = original(Add) - model(other Add input).
        ``same_prefix``: the conv's input is computed as in the current model (a region replaced
        after it), so the current model's cached activations and Gram matrices serve.
        """
        graph = model.graph
        index, node = next((i, n) for i, n in enumerate(graph.node) if output in n.output)
        geometry = conv_geometry(graph, node)
        if geometry is None:
            raise Skip(f"conv {node.name!r} has auto_pad, dilation or non-constant weights")
        consumers = [n for n in graph.node if output in n.input]
        target, other = output, None
        outputs = {vi.name for vi in graph.output}
        if len(consumers) == 1 and consumers[0].op_type in ("Add", "Sum") and len(consumers[0].input) == 2 \
                and output not in outputs:
            add = consumers[0]
            candidate_other = add.input[1] if add.input[0] == output else add.input[0]
            if candidate_other != output and candidate_other not in {i.name for i in graph.initializer}:
                target, other = add.output[0], candidate_other
        if target not in self.base_tensors:
            raise Skip(f"tensor {target!r} has no counterpart in the original model to fit to")
        started = time.perf_counter()
        names = [node.input[0]] + ([other] if other else [])
        inputs = self._acts(self.current if same_prefix else model, names)
        targets = self._base_acts(target)
        features = geometry["in_channels"] // geometry["group"] * int(np.prod(geometry["kernel"])) + 1
        total_rows = max(FIT_FLOPS / (features * features) / 2, MIN_ROWS_PER_FEATURE * features)
        key = (node.input[0], geometry["kernel"], geometry["strides"], geometry["pads"], geometry["group"])
        shared = self._grams.get(key) if same_prefix else None
        fit = ConvFit(geometry["in_channels"], geometry["out_channels"], geometry["kernel"], geometry["strides"],
                      geometry["pads"], geometry["group"], self.options.ridge,
                      max_rows=int(math.ceil(total_rows / len(targets))), seed=self.options.seed,
                      gram=None if shared is None else shared.copy())
        for k, x in enumerate(inputs[node.input[0]]):
            y = targets[k] if other is None else targets[k] - inputs[other][k]
            fit.add(x, y)
        if same_prefix and shared is None:
            self._grams[key] = fit.gram.copy()
        result = fit.solve()
        self.fit_seconds += time.perf_counter() - started
        out = onnx.ModelProto()
        out.CopyFrom(model)
        dtype = geometry["dtype"] if geometry["dtype"].kind == "f" else np.dtype(np.float32)
        weight = numpy_helper.from_array(result.weight.astype(dtype), unique_name(out.graph, f"{output}_fit_w"))
        bias = numpy_helper.from_array(result.bias.astype(dtype), unique_name(out.graph, f"{output}_fit_b"))
        conv = out.graph.node[index]
        conv.input[1] = weight.name
        if len(conv.input) > 2:
            conv.input[2] = bias.name
        else:
            conv.input.append(bias.name)
        out.graph.initializer.extend([weight, bias])
        drop_unused_initializers(out.graph)
        return out, result

    def build(self, model: onnx.ModelProto, cand: Candidate) -> tuple[onnx.ModelProto, list[str], float, float]:
        """The candidate applied to ``model`` and fitted: (model, fitted outputs, worst residual, saving)."""
        shaped, to_fit = self.structure(model, cand)
        saving = self.cost(model) - self.cost(shaped)
        if saving <= 0:
            raise Skip(f"not cheaper by the cost model (estimated cost x{1 - saving / self.cost(model):.2f})")
        residual = 0.0
        for output in to_fit:
            # A linearized region reads its source as the model before it did.
            same = cand.kind == LINEARIZE and model is self.current
            shaped, result = self.fit_conv(shaped, output, same_prefix=same)
            residual = max(residual, result.residual)
        return shaped, to_fit, residual, saving

    def cascade(self, model: onnx.ModelProto, kept: Sequence[Candidate]) -> onnx.ModelProto:
        """Refit, in graph order, every conv fitted before a later rewrite changed its prefix.

        Kept only when it lowers the holdout error within the budgets.
        """
        position = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
        stale: set[str] = set()
        for index, cand in enumerate(kept):
            where = position.get(cand.target, -1)
            stale.update(o for earlier in kept[:index] for o in earlier.fitted if position.get(o, -1) > where)
        if not stale:
            return model
        self._say(f"refit: refitting {len(stale)} convs whose inputs changed")
        cascaded = model
        for output in sorted(stale, key=lambda o: position[o]):
            try:
                cascaded, _ = self.fit_conv(cascaded, output)
            except Skip:
                continue
        before, after = evaluate(model, self.holdout), evaluate(cascaded, self.holdout)
        if after.rel_error < before.rel_error and self.budget_reason(after) is None:
            self.notes.append(f"cascade: refit {len(stale)} convs on their new inputs; holdout logit error "
                              f"{before.rel_error:.3f} -> {after.rel_error:.3f}")
            return cascaded
        return model

    # --- costs and shapes --------------------------------------------------------------------------

    def _shapes(self, model: onnx.ModelProto) -> dict:
        return infer_concrete(model, self.input_shapes)

    def cost(self, model: onnx.ModelProto) -> float:
        key = id(model)
        cached = self._costs.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        ctx = FoldContext(gs.import_onnx(model), FoldOptions(), infer_static(model), self._shapes(model))
        # Identity nodes stand in for erased branches only until the exact passes remove them.
        value = sum(node_cost(ctx, n) for n in ctx.graph.nodes if n.op != "Identity")
        self._costs[key] = (model, value)
        return value

    # --- the stage ---------------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        graph, shapes = self.base.graph, self._shapes(self.base)
        found = []
        for region in regions(graph):
            if linearize_reason(graph, region, shapes) is None:
                found.append(Candidate(LINEARIZE, region.source, region.target,
                                       f"{region.source} -> {region.target} ({region.convs} convs) as one fitted "
                                       f"{'3x3' if region.spatial_kernel else '1x1'} conv"))
            if erase_reason(graph, region, shapes) is None:
                found.append(Candidate(ERASE, region.source, region.target,
                                       f"branch of {region.target} ({region.convs} convs) erased, next convs refit"))
        return found

    def measure(self, cand: Candidate) -> None:
        try:
            model, fitted, residual, saving = self.build(self.current, cand)
        except Skip as exc:
            cand.status, cand.reason, cand.metrics = "rejected", str(exc), None
            return
        cand.model, cand.fitted, cand.residual, cand.benefit = model, fitted, residual, saving
        cand.saving = saving / self.base_cost
        cand.metrics = evaluate(model, self.holdout)
        cand.damage = cand.metrics.rel_error - self.current_metrics.rel_error
        cand.generation = self.generation

    def budget_reason(self, metrics: Metrics) -> str | None:
        base = self.base_metrics
        drop = self.options.max_accuracy_drop
        if drop is not None and metrics.accuracy is not None and base.accuracy is not None \
                and (base.accuracy - metrics.accuracy) * 100 > drop + 1e-9:
            return (f"holdout accuracy {metrics.accuracy:.2%} would fall {100 * (base.accuracy - metrics.accuracy):.2f} "
                    f"points from {base.accuracy:.2%} > --max-accuracy-drop {drop:g}")
        if metrics.agreement is not None and metrics.agreement < self.agreement_floor - 1e-12:
            return f"top-1 agreement with the original {metrics.agreement:.2%} < {self.agreement_floor:.2%}"
        if self.tolerance > 0 and metrics.max_rel > self.tolerance:
            return f"output error {metrics.max_rel:.3g} > --tolerance {self.tolerance:g}"
        return None

    def _target_reached(self) -> str | None:
        if self.options.target_latency is not None:
            ratio = self.cost(self.current) / self.base_cost
            if ratio <= self.options.target_latency:
                return f"--target-latency {self.options.target_latency:g} reached (estimated cost x{ratio:.2f})"
        if self.target_depth is not None and depth(self.current.graph) <= self.target_depth:
            return f"--target-depth {self.target_depth} reached"
        return None

    def accept(self, cand: Candidate, kept: list[Candidate]) -> None:
        model, metrics = cand.model, cand.metrics
        cand.status = "accepted"
        self.current, self.current_metrics = model, metrics
        self._current_cache, self._grams = {}, {}
        self.generation += 1
        kept.append(cand)

    def select(self, pool: list[Candidate]) -> list[Candidate]:
        kept: list[Candidate] = []
        pending = list(pool)
        for index, cand in enumerate(pending, 1):
            self._say(f"refit: measuring candidate {index}/{len(pending)}")
            self.measure(cand)
        pending = [c for c in pending if c.status == "pending"]
        while pending:
            reached = self._target_reached()
            if reached:
                self.notes.append(f"refit stopped: {reached}")
                break
            pending.sort(key=lambda c: c.score, reverse=True)
            top = pending[0]
            if top.generation != self.generation:
                self._say(f"refit: re-measuring after {len(kept)} accepted")
                self.measure(top)
                if top.status != "pending":
                    pending.pop(0)
                continue
            pending.pop(0)
            if not top.benefit > 0:
                top.status, top.reason = "rejected", "no cost saving"
                continue
            reason = self.budget_reason(top.metrics)
            if reason:
                top.status, top.reason = "rejected", reason
                continue
            self.accept(top, kept)
        for cand in pending:
            cand.status, cand.reason = "rejected", cand.reason or "not reached: a target was met first"
        return kept

    def replay(self, kept: Sequence[Candidate]) -> onnx.ModelProto:
        """The exact fold with ``kept`` applied in order, each fitted afresh (for the rollback)."""
        model = self.base
        for cand in kept:
            self.current = model  # fits read activations of the prefix built so far
            self._current_cache, self._grams = {}, {}
            model, cand.fitted, _, _ = self.build(model, cand)
        return self.cascade(model, kept)

    def run(self) -> RefitOutcome:
        with _one_blas_thread():
            return self._run()

    def _run(self) -> RefitOutcome:
        started = time.perf_counter()
        self.current, self.generation = self.base, 0
        self.base_cost = self.cost(self.base)
        self.base_metrics = self.current_metrics = evaluate(self.base, self.holdout)
        pool = self.candidates()
        kept = self.select(pool)
        final, exact_rewrites, declines = self.exact(self.cascade(self.current, kept)) if kept else (self.base, [], [])
        metrics = evaluate(final, self.holdout)
        rolled_back = []
        while kept and self.budget_reason(metrics):
            offender, final = self._rollback(kept)
            offender.status, offender.reason = "rolled back", f"final validation on the holdout failed: " \
                                                              f"{self.budget_reason(metrics)}"
            rolled_back.append(offender.label)
            final, exact_rewrites, declines = self.exact(final) if kept else (self.base, [], [])
            metrics = evaluate(final, self.holdout)
        return self._outcome(final, pool, kept, exact_rewrites, declines, metrics, rolled_back,
                             time.perf_counter() - started)

    def _rollback(self, kept: list[Candidate]) -> tuple[Candidate, onnx.ModelProto]:
        """Bisection for the shortest failing prefix of ``kept``; its last rewrite is undone."""
        low, high = 0, len(kept)
        while high - low > 1:
            middle = (low + high) // 2
            if self.budget_reason(evaluate(self.exact(self.replay(kept[:middle]))[0], self.holdout)):
                high = middle
            else:
                low = middle
        offender = kept.pop(high - 1)
        return offender, self.replay(kept)

    def _outcome(self, final, pool, kept, exact_rewrites, declines, metrics, rolled_back, seconds) -> RefitOutcome:
        fit_metrics = evaluate(final, self.fit_part)
        base_fit = evaluate(self.base, self.fit_part)
        rewrites = [Rewrite(c.kind, [c.source], [c.target], exact=False, error_bound=c.metrics.rel_error,
                            detail=f"{c.label}: fit residual {c.residual:.3f}, cost -{c.saving:.1%}, "
                                   f"holdout logit error {c.metrics.rel_error:.3f}, agreement "
                                   f"{_pct(c.metrics.agreement)}") for c in kept]
        refused = [Decline(c.kind, [c.source, c.target], c.reason) for c in pool if c.status != "accepted"]
        passed = self.budget_reason(metrics) is None
        if rolled_back:
            self.notes.append(f"rolled back after the final validation on the holdout failed: "
                              f"{'; '.join(rolled_back)}")
        validation = ValidationResult(
            passed, [OutputError("*", metrics.max_abs, metrics.max_rel, 0.0, passed, "" if passed else
                                 str(self.budget_reason(metrics)))],
            [{k: list(v.shape) for k, v in b.items()} for b in self.holdout.batches],
            self.tolerance, 0.0, "holdout",
            [f"budgets: top-1 agreement >= {self.agreement_floor:.2%} (got {_pct(metrics.agreement)})"])
        info = {
            "holdout_samples": self.holdout.samples, "fit_samples": self.fit_part.samples,
            "budgets": {"max_accuracy_drop": self.options.max_accuracy_drop, "min_agreement": self.agreement_floor,
                        "tolerance": self.tolerance or None, "target_latency": self.options.target_latency,
                        "target_depth": self.target_depth},
            "before": {"holdout": self.base_metrics.to_dict(), "fit": base_fit.to_dict()},
            "after": {"holdout": metrics.to_dict(), "fit": fit_metrics.to_dict()},
            "estimated_cost_ratio": self.cost(final) / self.base_cost,
            "fit_seconds": self.fit_seconds, "seconds": seconds,
            "candidates": [c.to_dict() for c in pool], "rolled_back": rolled_back, "notes": self.notes,
        }
        accuracy = None
        if self.base_metrics.accuracy is not None:
            accuracy = {"before": self.base_metrics.accuracy, "after": metrics.accuracy,
                        "samples": self.holdout.samples, "part": "holdout",
                        "fit_before": base_fit.accuracy, "fit_after": fit_metrics.accuracy}
        return RefitOutcome(final, rewrites + list(exact_rewrites), list(declines) + refused, info, validation,
                            accuracy)

    def _say(self, text: str) -> None:
        if self.progress:
            self.progress(text)


def _one_blas_thread():
    """BLAS on one thread while fitting, like the onnxruntime sessions: the normal equations are many
    small products, which a second thread slows down by 2-25x on a loaded two-core machine (measured).
    Uses threadpoolctl where installed (scikit-learn brings it), which restores the setting after."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.2%}"
