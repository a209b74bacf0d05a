"""One call that runs a depth-removing method end to end on the user's own model.

:func:`compress` makes the model foldable (:func:`~graphfold.train.convert.make_foldable`), trains it
with the method for ``epochs`` epochs *in total* (every retraining and fine-tuning included, so a
baseline trained for the same number of epochs is a fair comparison), makes every data-dependent
choice on the validation split only, exports it, folds the export with graphfold (exact by
default) and returns the model, the folded ONNX model, graphfold's report and a table of stages.

Methods and their choices:

* ``layer-folding``: 60% of the epochs with ``lam * sum|1 - a^2|`` (slopes start at 0); then the
  activations are ranked by slope and the most linear ones are made identities (the others
  ReLUs), as many as keep validation accuracy within ``budget`` points of the reference
  (none when no count does); the padding of the linear
  conv chains moves onto their first conv; the rest of the epochs fine-tune.
* ``implosion``: 50% of the epochs with an L1 on the units' priority scales; then the
  lowest-priority identity unit is erased and the network retrained, repeatedly, while validation
  accuracy stays within ``budget`` points of the reference; the epochs left fine-tune.
* ``epsilon``: 80% of the epochs with strict-identity gates (eps 0 for the first 20%, then
  ``eps``) and an L1 on each gated branch's last BatchNorm scale; units whose branch stays within
  eps on the training data are erased; the rest of the epochs fine-tune.
* ``fade``: every skip weight goes from 1 to 0 between 10% and 70% of training (cosine).
* ``none``: plain training, the baseline.

The reference of the budget is ``reference_accuracy`` when given (the validation accuracy of the
baseline the method must not fall below, e.g. the plain network trained for as many epochs), else
the method's own network after its first phase. The latter lets a method whose first phase went
badly pass its own rule far below the baseline, so an evaluation should pass the baseline's.
``CompressResult.within_budget`` says whether the choice met the rule (``None``: the method
makes no budgeted choice), e.g. ``False`` when no count of linear activations reaches the floor.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from graphfold.train.convert import make_foldable
from graphfold.train.eps_resnet import (
    deploy_epsilon_resnet,
    drop_gates,
    gate_sparsity_loss,
    gated_units,
    set_epsilon,
)
from graphfold.train.export import export_onnx
from graphfold.train.implosion import implode, priority_l1, unit_priorities
from graphfold.train.layer_folding import clip_slopes, folding_activations, slope_regularizer
from graphfold.train.loop import evaluate, fit
from graphfold.train.padding import relocate_padding
from graphfold.train.residual import residual_units
from graphfold.train.skip_fading import SkipFadeScheduler, SkipWeight

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "CompressResult", "Stage", "TrainOptions", "compress", "conv_depth"]

METHODS = ("layer-folding", "implosion", "epsilon", "fade", "none")
Data = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainOptions:
    """How every phase trains: SGD with Nesterov momentum and a cosine schedule per phase."""

    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    max_shift: int = 1
    seed: int = 0
    progress: bool = False

    def fit(self, model: nn.Module, data: Data, epochs: int, lr_scale: float = 1.0, **kwargs) -> None:
        if epochs <= 0:
            return
        fit(model, data[0], data[1], epochs, lr=self.lr * lr_scale, batch_size=self.batch_size,
            weight_decay=self.weight_decay, max_shift=self.max_shift, seed=self.seed,
            progress=self.progress, **kwargs)


@dataclass
class Stage:
    """One row of the result table: what the network is after a step, and its validation accuracy."""

    stage: str
    val_accuracy: float
    epochs_so_far: int
    removed: int = 0  # activations made identities, or residual units erased, or skips removed


@dataclass
class CompressResult:
    model: nn.Module
    onnx: onnx.ModelProto | None
    report: object | None  # graphfold.Report
    stages: list[Stage] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    epochs: int = 0
    depth: int | None = None  # Conv nodes on the longest path of the folded export
    reference_accuracy: float | None = None  # the validation accuracy the budget was measured against
    within_budget: bool | None = None  # the budgeted choice met its floor; None: no budgeted choice

    def markdown(self) -> str:
        lines = ["| stage | removed | epochs so far | validation accuracy |", "|---|---|---|---|"]
        lines += [f"| {s.stage} | {s.removed} | {s.epochs_so_far} | {s.val_accuracy:.2f}% |" for s in self.stages]
        return "\n".join(lines)


def conv_depth(model: onnx.ModelProto) -> int:
    """The number of Conv/Gemm/MatMul nodes on the longest input-to-output path of an ONNX graph."""
    depth: dict[str, int] = {}
    best = 0
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        here = max((depth.get(name, 0) for name in node.input if name), default=0)
        here += node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for name in node.output:
            depth[name] = here
        best = max(best, here)
    return best


@dataclass
class _Budget:
    """A method's accuracy budget: ``points`` below ``reference`` (given, or its first phase's)."""

    points: float
    reference: float | None = None
    met: bool | None = None

    def set_reference(self, first_phase: float) -> None:
        if self.reference is None:
            self.reference = first_phase

    @property
    def floor(self) -> float:
        return self.reference - self.points


def _split(epochs: int, fraction: float) -> tuple[int, int]:
    first = min(epochs, max(1, round(epochs * fraction)))
    return first, epochs - first


def _layer_folding(model: nn.Module, train: Data, val: Data, epochs: int, budget: _Budget,
                   options: TrainOptions, lam: float, stages: list[Stage], random: int | None) -> list[str]:
    first, rest = _split(epochs, 0.6)
    options.fit(model, train, first, penalty=lambda m: slope_regularizer(m, lam),
                after_step=lambda: clip_slopes(model))
    trained = evaluate(model, *val)
    stages.append(Stage("trained with slope regularizer", trained, first))
    budget.set_reference(trained)
    acts = sorted(folding_activations(model), key=lambda item: -float(item[1].slope.detach().max()))
    if random is None:
        chosen = choose_linear_activations(model, [name for name, _ in acts], val, budget.floor)
    else:
        chosen = _random_pick([name for name, _ in acts], random, options.seed)
    snap_to(model, chosen)
    how = " at random" if random is not None else ""
    snapped = evaluate(model, *val)
    stages.append(Stage(f"{len(chosen)} of {len(acts)} activations made identities{how}", snapped,
                        first, len(chosen)))
    if random is None:  # not met when even no identity at all stays within the floor
        budget.met = snapped >= budget.floor
    example = train[0][:1]
    relocate_padding(model, example)
    options.fit(model, train, rest, lr_scale=0.5)
    stages.append(Stage("fine-tuned", evaluate(model, *val), epochs, len(chosen)))
    return chosen


def _random_pick(names: Sequence[str], count: int, seed: int) -> list[str]:
    if count > len(names):
        raise ValueError(f"cannot pick {count} of {len(names)} at random")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(10_000 + seed))
    return [names[i] for i in sorted(order[:count].tolist())]


def snap_to(model: nn.Module, identities: Sequence[str]) -> None:
    """Snap the named Layer Folding activations to the identity and every other one to its ReLU."""
    wanted = set(identities)
    for name, act in folding_activations(model):
        with torch.no_grad():
            act.slope.fill_(1.0 if name in wanted else 0.0)
        act.snap(0.5)


def choose_linear_activations(model: nn.Module, ranked: Sequence[str], val: Data, floor: float) -> list[str]:
    """The longest prefix of ``ranked`` that, snapped to identities, keeps validation accuracy >= floor.

    Every prefix length is tried, longest first: accuracy need not fall monotonically with the
    number made linear (snapping every slope to 0 can hurt more than snapping the high ones to 1).
    One validation pass per activation at most.
    """
    for k in range(len(ranked), -1, -1):
        trial = copy.deepcopy(model)
        snap_to(trial, ranked[:k])
        if evaluate(trial, *val) >= floor:
            return list(ranked[:k])
    return []


def _implosion(model: nn.Module, train: Data, val: Data, epochs: int, budget: _Budget,
               options: TrainOptions, lam: float, stages: list[Stage],
               random: int | None) -> tuple[nn.Module, list[str]]:
    first, rest = _split(epochs, 0.5)
    penalty = lambda m: priority_l1(m, lam)  # noqa: E731
    options.fit(model, train, first, penalty=penalty)
    trained = evaluate(model, *val)
    stages.append(Stage("trained with priority L1", trained, first))
    budget.set_reference(trained)
    if random is not None:
        return model, _erase_at_random(model, random, train, val, rest, options, stages, epochs)
    erasable = len(unit_priorities(model))
    retrain_epochs = max(1, rest // max(erasable, 1))
    spent = itertools.count()

    def retrain(candidate: nn.Module) -> None:
        next(spent)
        options.fit(candidate, train, retrain_epochs, lr_scale=0.2, penalty=penalty)

    max_erasures = min(erasable, rest // retrain_epochs) if rest >= retrain_epochs else 0
    result = implode(model, retrain, lambda m: evaluate(m, *val), budget.points, budget.reference,
                     max_erasures=max_erasures)
    # met when the network it keeps is within the floor (the trained one, if nothing was erased)
    kept = result.steps[len(result.erased) - 1].accuracy if result.erased else trained
    budget.met = kept >= budget.floor
    used = first
    for k, step in enumerate(result.steps, 1):
        used += retrain_epochs
        stages.append(Stage(f"erase {step.unit}" + ("" if step.accepted else " (rejected)"),
                            step.accuracy, used, k if step.accepted else k - 1))
    left = epochs - used
    options.fit(result.model, train, left, lr_scale=0.2)
    stages.append(Stage("fine-tuned", evaluate(result.model, *val), epochs, len(result.erased)))
    return result.model, result.erased


def _erase_at_random(model: nn.Module, count: int, train: Data, val: Data, rest: int,
                     options: TrainOptions, stages: list[Stage], epochs: int,
                     candidates: Sequence[str] | None = None) -> list[str]:
    """The control of an erasing method: erase ``count`` random units at once, train the epochs left."""
    units = dict(residual_units(model))
    names = list(unit_priorities(model)) if candidates is None else list(candidates)
    erased = _random_pick(names, count, options.seed)
    for name in erased:
        units[name].erase()
    stages.append(Stage(f"{count} units erased at random", evaluate(model, *val), epochs - rest, count))
    options.fit(model, train, rest, lr_scale=0.2)
    stages.append(Stage("fine-tuned", evaluate(model, *val), epochs, count))
    return erased


def _epsilon(model: nn.Module, train: Data, val: Data, epochs: int, options: TrainOptions,
             lam: float, eps: float, stages: list[Stage], random: int | None) -> list[str]:
    first, rest = _split(epochs, 0.8)
    steps_per_epoch = math.ceil(len(train[0]) / options.batch_size)
    warmup = max(1, int(0.2 * first * steps_per_epoch))
    count = itertools.count(1)

    def after_step() -> None:
        if next(count) == warmup:
            set_epsilon(model, eps)

    set_epsilon(model, 0.0)
    options.fit(model, train, first, penalty=lambda m: gate_sparsity_loss(m, lam), after_step=after_step)
    stages.append(Stage(f"trained with gates (eps {eps:g})", evaluate(model, *val), first))
    if random is not None:
        names = [name for name, _ in gated_units(model)]
        drop_gates(model)
        return _erase_at_random(model, random, train, val, rest, options, stages, epochs, names)
    erased = deploy_epsilon_resnet(model, train[0].split(512))
    stages.append(Stage(f"{len(erased)} switched-off units erased", evaluate(model, *val), first, len(erased)))
    options.fit(model, train, rest, lr_scale=0.2)
    stages.append(Stage("fine-tuned", evaluate(model, *val), epochs, len(erased)))
    return erased


def _fade(model: nn.Module, train: Data, val: Data, epochs: int, options: TrainOptions,
          stages: list[Stage]) -> list[str]:
    weights = [m for m in model.modules() if isinstance(m, SkipWeight)]
    total = epochs * math.ceil(len(train[0]) / options.batch_size)
    scheduler = SkipFadeScheduler(weights, total, 0.1, 0.7)
    options.fit(model, train, epochs, after_step=scheduler.step)
    stages.append(Stage(f"{len(weights)} skips faded to 0", evaluate(model, *val), epochs, len(weights)))
    return [f"skip {i}" for i in range(len(weights))]


def compress(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    method: str,
    epochs: int,
    budget: float = 1.0,
    *,
    options: TrainOptions | None = None,
    lam: float | None = None,
    eps: float = 2.5,
    fold: bool = True,
    fold_options: dict | None = None,
    random_erasures: int | None = None,
    reference_accuracy: float | None = None,
) -> CompressResult:
    """Compress ``model`` with ``method`` in ``epochs`` epochs in total; see the module docstring.

    ``train_data`` and ``val_data`` are ``(images, labels)`` tensors; ``budget`` is the validation
    accuracy, in points, a method may give up below ``reference_accuracy`` (a validation accuracy
    in percent, e.g. the baseline's on the same split; default: the method's own network after its
    first phase). ``lam`` defaults per method (layer folding 1.0,
    implosion 1e-3, epsilon 5e-3). The input model is not modified. ``fold=False`` skips the
    export and graphfold (for quick experiments); ``fold_options`` go to ``graphfold.fold``
    (e.g. ``{"fold_all": True}`` to merge conv chains even where the cost model declines).

    ``random_erasures=k`` runs the method's control instead: the same schedule, but ``k`` units
    (activations for Layer Folding) chosen at random instead of by the method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if random_erasures is not None and method not in ("layer-folding", "implosion", "epsilon"):
        raise ValueError(f"random_erasures is a control for the erasing methods, not for {method!r}")
    options = options or TrainOptions()
    example = train_data[0][:2]
    if method == "none":
        work = copy.deepcopy(model)
    else:
        residuals = None if method == "layer-folding" else method
        work = make_foldable(model, example, activations="folding" if method == "layer-folding" else None,
                             residuals=residuals)
    torch.manual_seed(options.seed)
    stages: list[Stage] = []
    limit = _Budget(budget, reference_accuracy)
    if method == "layer-folding":
        removed = _layer_folding(work, train_data, val_data, epochs, limit, options,
                                 1.0 if lam is None else lam, stages, random_erasures)
    elif method == "implosion":
        work, removed = _implosion(work, train_data, val_data, epochs, limit, options,
                                   1e-3 if lam is None else lam, stages, random_erasures)
    elif method == "epsilon":
        removed = _epsilon(work, train_data, val_data, epochs, options, 5e-3 if lam is None else lam, eps,
                           stages, random_erasures)
    elif method == "fade":
        removed = _fade(work, train_data, val_data, epochs, options, stages)
    else:
        options.fit(work, train_data, epochs)
        stages.append(Stage("trained", evaluate(work, *val_data), epochs))
        removed = []
    result = CompressResult(work, None, None, stages, removed, epochs,
                            reference_accuracy=limit.reference, within_budget=limit.met)
    if fold:
        import graphfold

        exported = export_onnx(work, None, (1, *train_data[0].shape[1:]), keep_batchnorm=True)
        result.onnx, result.report = graphfold.fold(exported, **(fold_options or {}))
        result.depth = conv_depth(result.onnx)
    return result
