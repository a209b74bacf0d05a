"""The two parts of the calibration data, and how a model is scored on one against the original.

The relative logit error ``||y' - y|| / ||y||`` ranks candidates; ``max|y' - y| / max|y|`` is what
``--tolerance`` bounds; top-1 agreement with the original and accuracy against the labels (first
output, classes on axis 1) are the budgets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from graphfold.calibration import Calibration
from graphfold.refit.activations import Session


@dataclass
class Metrics:
    """A model's outputs against the original's on one part of the calibration data."""

    rel_error: float  # ||y' - y|| / ||y|| over all outputs
    max_rel: float  # max|y' - y| / max|y|, worst output (what --tolerance bounds)
    max_abs: float
    agreement: float | None  # share of samples whose top-1 (first output) matches the original's
    accuracy: float | None  # top-1 against the labels

    def to_dict(self) -> dict:
        return {"rel_error": self.rel_error, "max_rel": self.max_rel, "max_abs": self.max_abs,
                "agreement": self.agreement,
                "accuracy": self.accuracy}


class Part:
    """Feeds of one part of the calibration data, the original's outputs on them, the labels."""

    def __init__(self, calibration: Calibration, indices: np.ndarray, batch: int, reference: Session) -> None:
        self.samples = len(indices)
        self.batches = [{**{k: v[indices[i:i + batch]] for k, v in calibration.arrays.items()}, **calibration.fixed}
                        for i in range(0, len(indices), batch)]
        self.labels = calibration.labels[indices] if calibration.labels is not None else None
        self.expected = [reference.run(b) for b in self.batches]


def evaluate(model: onnx.ModelProto, part: Part) -> Metrics:
    """``model``'s outputs against the original's on ``part``."""
    session = Session(model)
    diff = norm = worst = largest = 0.0
    scale: dict[str, float] = {}
    agree = correct = start = 0
    first = session.outputs[0]
    for batch, expected in zip(part.batches, part.expected):
        got = session.run(batch)
        for name, ref in expected.items():
            ref64, out64 = np.asarray(ref, np.float64), np.asarray(got[name], np.float64)
            delta = out64 - ref64
            diff += float(np.sum(delta * delta))
            norm += float(np.sum(ref64 * ref64))
            scale[name] = max(scale.get(name, 0.0), float(np.max(np.abs(ref64))) if ref64.size else 0.0)
            gap = float(np.max(np.abs(delta))) if delta.size else 0.0
            largest = max(largest, gap)
            worst = max(worst, gap / scale[name] if scale[name] > 0 else 0.0)
        ref_top, top = _top1(expected[first]), _top1(got[first])
        if top is not None and ref_top is not None:
            agree += int(np.count_nonzero(top == ref_top))
            if part.labels is not None:
                correct += int(np.count_nonzero(top == part.labels[start:start + len(top)]))
            start += len(top)
    has_classes = _top1(part.expected[0][first]) is not None
    return Metrics(math.sqrt(diff / norm) if norm > 0 else 0.0, worst, largest,
                   agree / part.samples if has_classes else None,
                   correct / part.samples if has_classes and part.labels is not None else None)


def _top1(scores) -> np.ndarray | None:
    scores = np.asarray(scores)
    if scores.ndim < 2:
        return None
    flat = scores.reshape(scores.shape[0], scores.shape[1], -1)
    return flat[:, :, 0].argmax(axis=1) if flat.shape[2] == 1 else None
