"""What a user asks of ``fold``: ``Options``, and ``ApproxOptions`` for the approximate stage.

A module of its own so that an exact run, which only reads these options to see that nothing
was asked, does not import the stage (calibration, measurement, onnxruntime).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from graphfold.errors import UsageError
from graphfold.refit import RefitOptions
from graphfold.validate import DEFAULT_RTOL, DEFAULT_SEEDS

if TYPE_CHECKING:
    import numpy as np

    from graphfold.calibration import CalibrationSource
    from graphfold.inputs import ShapeMap

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


# The approximate stage's fields, which fold also takes one by one as keywords.
_APPROX_FIELDS = ("tolerance", "snap_slope", "epsilon", "drop_branches", "target_depth", "allow_border")


@dataclass
class Options:
    """Everything ``fold``, ``fold_file`` and ``inspect`` take besides the model.

    ``passes``/``skip_passes`` choose the pipeline (``graphfold --list-passes``); ``fold_all``
    makes every exact merge, even where the cost model says it does not pay. ``input_shapes``
    fix dynamic dims for analysis and validation (never in the written model); ``input_values``
    give inputs random data would not fit (a sample rate, a state) fixed values: arrays or numbers
    by input name, fed by validation and to calibration data that lacks them.

    Initializers that are also graph inputs may be fed at run time, so they are not folded;
    ``freeze_initializer_inputs`` takes them as the constants they are in most exports and drops
    them from the inputs (validation still runs the original with their defaults).

    ``check`` validates the result against the original under onnxruntime on ``seeds`` random
    inputs, passing when ``max|y' - y| <= 1e-6 + rtol * max|y|`` per output.

    Approximate folding is off unless asked for in ``approx`` (``ApproxOptions``: ``snap_slope``,
    ``epsilon``, ``drop_branches``, ``target_depth``, ``allow_border``): every approximation is
    measured on ``calibration`` data (an ``.npz`` path or arrays keyed by input name; seeded random
    inputs without it) and all of them together stay within ``approx.tolerance``, the largest
    accepted ``max|y' - y| / max|y|`` per output. Such a result is validated on the calibration
    data at that tolerance, whatever ``check`` says. ``labels`` score accuracy on that data.

    ``refit`` (True, or ``RefitOptions`` with budgets) removes nonlinear depth with least-squares
    compensation (see :mod:`graphfold.refit`); it needs real ``calibration`` data, and the result
    is validated on the held-out part of it instead of random inputs.
    """

    passes: Sequence[str] | None = None
    skip_passes: Sequence[str] = ()
    fold_all: bool = False
    input_shapes: ShapeMap | None = None
    input_values: Mapping[str, object] | None = None
    freeze_initializer_inputs: bool = False
    check: bool = True
    rtol: float = DEFAULT_RTOL
    seeds: Sequence[int] = DEFAULT_SEEDS
    progress: Callable[[str], None] | None = None
    calibration: CalibrationSource = None
    labels: str | np.ndarray | None = None
    approx: ApproxOptions = field(default_factory=ApproxOptions)
    refit: RefitOptions | bool = False

    @classmethod
    def of(cls, options: Options | None = None, **keywords) -> Options:
        """``options``, or the ``Options`` the keywords name: its fields, with the approximate
        stage's given either as ``approx`` (``approx_options``, its older name) or one by one
        (``tolerance=``, ``snap_slope=``...). Each way of saying a thing excludes the others:
        saying it twice is a ``UsageError``, never one silently winning."""
        if options is not None:
            if keywords:
                raise UsageError(f"give either an Options or keywords, not both (got {', '.join(sorted(keywords))})")
            return options
        if "approx_options" in keywords:
            if "approx" in keywords:
                raise UsageError("approx and approx_options are one option: give one")
            keywords["approx"] = keywords.pop("approx_options")
        flat = {name: keywords.pop(name) for name in _APPROX_FIELDS if name in keywords}
        if flat and keywords.get("approx") is not None:
            raise UsageError(f"give the approximate options either as approx=ApproxOptions(...) or as keywords "
                             f"({', '.join(sorted(flat))}), not both")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        if keywords.get("approx") is None:
            keywords["approx"] = ApproxOptions(**flat)
        return cls(**keywords)

    @property
    def exact(self) -> bool:
        """Nothing but exact rewrites asked for: no refit, approximation or calibration data."""
        return not self.refit and not (self.approx.requested or self.approx.tolerance > 0
                                       or self.calibration is not None or self.labels is not None)
