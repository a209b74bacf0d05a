"""What a user asks of the approximate stage, apart from the stage itself.

A module of its own so that an exact run, which only reads these options to see that nothing
was asked, does not import the stage (calibration, measurement, onnxruntime).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from graphfold.errors import UsageError

DEFAULT_SELECTION_SAMPLES = 256


@dataclass
class ApproxOptions:
    """What the user asked for; every field off by default."""

    tolerance: float = 0.0
    snap_slope: float | None = None
    epsilon: float | None = None
    drop_branches: int = 0
    target_depth: int | None = None
    allow_border: bool = False
    selection_samples: int = DEFAULT_SELECTION_SAMPLES  # greedy measurements; validation uses all

    @property
    def requested(self) -> bool:
        return (self.snap_slope is not None or self.epsilon is not None or self.drop_branches > 0
                or self.target_depth is not None or self.allow_border)

    def check(self) -> None:
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise UsageError(f"--tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.snap_slope is not None and not 0 < self.snap_slope <= 1:
            raise UsageError(f"--snap-slope must lie in (0, 1], got {self.snap_slope}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise UsageError(f"--epsilon must be a finite number >= 0, got {self.epsilon}")
        if self.drop_branches < 0:
            raise UsageError(f"--drop-branches must be >= 0, got {self.drop_branches}")
        if self.target_depth is not None and self.target_depth < 1:
            raise UsageError(f"--target-depth must be >= 1, got {self.target_depth}")
        if self.selection_samples < 1:
            raise UsageError(f"selection_samples must be >= 1, got {self.selection_samples}")
