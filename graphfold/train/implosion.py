"""Network Implosion (Ida & Fujiwara, IJCNN 2019, arXiv 1906.03826).

Every residual unit gets a learnable scale on its branch, ``x + s * F(x)``, initialised to 1 and
pushed down by an L1 penalty; the unit's priority is ``|s|``. After training, :func:`implode`
repeatedly erases the lowest-priority unit, retrains for a few epochs and measures validation
accuracy; it stops at the first erasure that leaves accuracy more than ``margin`` below the
baseline and returns the last accepted network. Only identity-shortcut units are erased by
default: they become exact identities, where a projection unit would leave its 1x1 conv behind.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from graphfold.train.residual import Residual, residual_units

logger = logging.getLogger(__name__)

__all__ = [
    "ImplosionStep",
    "ImplosionResult",
    "PriorityScale",
    "erase_lowest_priority",
    "implode",
    "priority_l1",
    "unit_priorities",
]


class PriorityScale(nn.Module):
    """``s * F`` with a learnable scalar ``s`` (init 1); the unit's priority is ``|s|``."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f * self.scale

    @property
    def priority(self) -> float:
        return float(self.scale.detach().abs())


def _erasable(unit: Residual, identity_only: bool) -> bool:
    return (isinstance(unit.gate, PriorityScale) and not unit.erased
            and (unit.identity_shortcut or not identity_only))


def unit_priorities(model: nn.Module, identity_only: bool = True) -> dict[str, float]:
    """Priority ``|s|`` of every unit that may still be erased, by name."""
    return {name: unit.gate.priority for name, unit in residual_units(model)
            if _erasable(unit, identity_only)}


def priority_l1(model: nn.Module, lam: float) -> torch.Tensor:
    """``lam * sum |s|`` over all priority scales still in the network."""
    terms = [unit.gate.scale.abs().sum() for _, unit in residual_units(model)
             if isinstance(unit.gate, PriorityScale) and not unit.erased]
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


def erase_lowest_priority(model: nn.Module, identity_only: bool = True) -> str | None:
    """Erase the unit of lowest priority in place; return its name (None when none is left)."""
    priorities = unit_priorities(model, identity_only)
    if not priorities:
        return None
    name = min(priorities, key=priorities.__getitem__)
    dict(residual_units(model))[name].erase()
    logger.info("implosion: erased %s (priority %.4g)", name, priorities[name])
    return name


@dataclass
class ImplosionStep:
    """One erasure: which unit, its priority, validation accuracy after retraining, kept or not."""

    unit: str
    priority: float
    accuracy: float
    accepted: bool


@dataclass
class ImplosionResult:
    model: nn.Module
    baseline_accuracy: float
    erased: list[str] = field(default_factory=list)
    steps: list[ImplosionStep] = field(default_factory=list)


def implode(
    model: nn.Module,
    retrain: Callable[[nn.Module], None],
    evaluate: Callable[[nn.Module], float],
    margin: float,
    baseline_accuracy: float | None = None,
    max_erasures: int | None = None,
    identity_only: bool = True,
) -> ImplosionResult:
    """Erase, retrain, measure; stop when accuracy < baseline - margin and keep the last good model.

    ``retrain`` fine-tunes a model in place (a few epochs), ``evaluate`` returns its validation
    accuracy (same unit as ``margin``). The input model is not modified.
    """
    accepted = copy.deepcopy(model)
    baseline = evaluate(accepted) if baseline_accuracy is None else baseline_accuracy
    result = ImplosionResult(model=accepted, baseline_accuracy=baseline)
    while max_erasures is None or len(result.erased) < max_erasures:
        candidate = copy.deepcopy(result.model)
        priorities = unit_priorities(candidate, identity_only)
        name = erase_lowest_priority(candidate, identity_only)
        if name is None:
            break
        retrain(candidate)
        accuracy = evaluate(candidate)
        ok = accuracy >= baseline - margin
        result.steps.append(ImplosionStep(name, priorities[name], accuracy, ok))
        logger.info("implosion: %s erased, accuracy %.4f (baseline %.4f) -> %s",
                    name, accuracy, baseline, "kept" if ok else "stop")
        if not ok:
            break
        result.model = candidate
        result.erased.append(name)
    return result
