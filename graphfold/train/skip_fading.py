"""Skip fading, the homotopy of the algebraic-collapse paper (Joyce & Verschelde, arXiv 2408.07815).

The shortcut of a residual unit is scaled by a weight ``w``: ``post(w * x + F(x))``. A scheduler
takes ``w`` from 1 to 0 during training, so the network ends as a plain feed-forward CNN. At
``w == 1`` the unit exports as an ordinary residual (no Mul), in between as ``Add(Mul(x, w), F)``,
and at ``w == 0`` as ``post(F(x))``: the skip Add is gone from the ONNX graph.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from graphfold.train.residual import residual_units

__all__ = ["SkipFadeScheduler", "SkipWeight", "add_skip_weights", "skip_free"]


class SkipWeight(nn.Module):
    """Multiply the shortcut by a scheduled, non-learned weight, a Python float (not in the state dict)."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A constant 1 would still export a Mul node; skip it.
        return x if self.weight == 1.0 else x * self.weight

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


def add_skip_weights(model: nn.Module, identity_only: bool = False) -> list[SkipWeight]:
    """Give every residual unit (or only those with an identity shortcut) a skip weight of 1."""
    weights = []
    for _, unit in residual_units(model):
        if identity_only and not unit.identity_shortcut:
            continue
        if unit.skip is None:
            unit.skip = SkipWeight(1.0)
        weights.append(unit.skip)
    return weights


class SkipFadeScheduler:
    """Take skip weights from 1 to 0 between two fractions of training, linearly or by a cosine.

    ``step()`` once per optimizer step; ``w = 1`` before ``start``, ``0`` from ``end`` on, so the
    last stretch of training (``1 - end``) fits the network without skips.
    """

    def __init__(
        self,
        weights: Iterable[SkipWeight],
        total_steps: int,
        start: float = 0.1,
        end: float = 0.7,
        shape: str = "cosine",
    ) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got start={start}, end={end}")
        if shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {shape!r}")
        self.weights = list(weights)
        self.total_steps = total_steps
        self.start, self.end, self.shape = start, end, shape
        self.steps = 0
        self._apply()

    def value(self, step: int) -> float:
        t = (step / max(self.total_steps, 1) - self.start) / (self.end - self.start)
        t = min(max(t, 0.0), 1.0)
        if self.shape == "linear":
            return 1.0 - t
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def step(self) -> float:
        self.steps += 1
        return self._apply()

    def _apply(self) -> float:
        w = self.value(self.steps)
        for skip in self.weights:
            skip.weight = w
        return w


def skip_free(model: nn.Module) -> bool:
    """True when no residual unit of the model adds its shortcut any more."""
    return all(unit.skip_removed or unit.erased for _, unit in residual_units(model))
