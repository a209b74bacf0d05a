"""Post-training learned folding: remove nonlinear depth with least-squares compensation (``--refit``).

A region of a trained network (a residual unit, an inverted residual, a conv-act-conv pair) is
replaced by ONE conv whose weights are fitted in closed form, or a residual branch is erased and
the convs after it are refit, so that on calibration inputs computed by the already compressed
prefix the network reproduces the original's activation there. Candidates are chosen greedily by
cost-model saving per unit of damage measured on held-out calibration samples, within the
accuracy and agreement budgets. Approximate by construction: every number is measured.

This module holds only the options, so importing it costs nothing; the stage
(:mod:`graphfold.refit.stage`) is imported when a refit runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from graphfold.errors import UsageError

MIN_HOLDOUT = 32
DEFAULT_HOLDOUT = 0.25


@dataclass
class RefitOptions:
    """Budgets and data split of a refit run (see ``graphfold --help``, "learned folding")."""

    max_accuracy_drop: float | None = None  # points of top-1 accuracy on the holdout (needs labels)
    min_agreement: float | None = None  # share of holdout samples whose top-1 matches the original's
    target_latency: float | None = None  # stop once the cost model says this fraction of the original
    holdout: float = DEFAULT_HOLDOUT  # share of calibration samples never fitted on
    ridge: float = 1e-5  # times the mean diagonal of X^T X
    seed: int = 0  # of the holdout split and of row sampling

    def check(self) -> None:
        if self.max_accuracy_drop is not None and not (math.isfinite(self.max_accuracy_drop)
                                                       and 0 <= self.max_accuracy_drop <= 100):
            raise UsageError(f"--max-accuracy-drop must be points in [0, 100], got {self.max_accuracy_drop}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise UsageError(f"--min-agreement must be a fraction in [0, 1], got {self.min_agreement}")
        if self.target_latency is not None and not 0 < self.target_latency <= 1:
            raise UsageError(f"--target-latency must be a ratio in (0, 1], got {self.target_latency}")
        if not 0 < self.holdout < 1:
            raise UsageError(f"--holdout must be a fraction in (0, 1), got {self.holdout}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise UsageError(f"ridge must be a finite number >= 0, got {self.ridge}")

    def agreement_floor(self) -> float:
        """The agreement budget: as given, else one disagreement per point of allowed accuracy drop.

        Holdout accuracy near 100% barely sees damage when the calibration set is the training
        set; every sample whose class changes can cost accuracy on unseen data, so by default the
        share of changed classes is bounded by the accuracy budget too (0.99 without one).
        """
        if self.min_agreement is not None:
            return self.min_agreement
        if self.max_accuracy_drop is not None:
            return 1.0 - self.max_accuracy_drop / 100.0
        return 0.99


__all__ = ["RefitOptions", "MIN_HOLDOUT", "DEFAULT_HOLDOUT"]
