"""Running models on calibration data: output error against the original, tensor statistics.

The output error of a model is ``max|y' - y| / max|y|``, per output and batch, worst over both:
the number ``compare_models`` checks at ``rtol`` with ``atol = 0``, so what the approximate
stage selects on and what the final validation enforces are the same measure. Every run is
under onnxruntime with its optimizations off (``validate.Runner``).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import onnx
from onnx import helper

from graphfold.calibration import Calibration, top1_accuracy
from graphfold.passes.approximate import TensorStats
from graphfold.shapes import skeleton
from graphfold.validate import Runner, compare_outputs

log = logging.getLogger(__name__)


class Measurer:
    """Runs models on the calibration batches and compares them with the original's outputs."""

    def __init__(self, original: onnx.ModelProto, calibration: Calibration, selection_samples: int) -> None:
        self.calibration = calibration
        self.reference = Runner(original, "original")
        self.full = list(calibration.batches())
        self._expected = [self.reference.run(b) for b in self.full]
        if selection_samples >= calibration.samples:
            self.selection, self._expected_selection = self.full, self._expected
        else:
            self.selection = list(calibration.batches(selection_samples))
            self._expected_selection = [self.reference.run(b) for b in self.selection]

    def error(self, model: onnx.ModelProto, full: bool = False) -> float:
        """Worst ``max|y' - y| / max|y|`` over outputs and batches (inf if the model cannot run)."""
        batches, expected_outputs = (self.full, self._expected) if full else \
            (self.selection, self._expected_selection)
        try:
            runner = Runner(model, "approximate")
            worst = 0.0
            for batch, expected in zip(batches, expected_outputs):
                got = runner.run(batch)
                for name in self.reference.output_names:
                    worst = max(worst, compare_outputs(name, expected[name], got[name], 0.0, 0.0).max_rel)
            return worst
        except Exception as exc:  # a candidate that breaks the model is just infinitely wrong
            log.debug("measuring failed: %s", exc)
            return math.inf

    def statistics(self, model: onnx.ModelProto, names: Sequence[str]) -> dict[str, TensorStats]:
        """Min, max, sum of squares of the named tensors over the selection batches."""
        inputs = {vi.name for vi in model.graph.input}
        extra = [n for n in dict.fromkeys(names) if n not in inputs]
        runner = Runner(_with_outputs(model, extra), "instrumented")
        stats = {n: TensorStats() for n in names}
        for batch in self.selection:
            got = runner.run(batch)
            for name in stats:
                value = batch.get(name) if name in inputs else got.get(name)
                if value is not None:
                    stats[name].add(value)
        return stats

    def accuracy(self, model: onnx.ModelProto) -> float | None:
        runner = Runner(model, "optimized")
        first = runner.output_names[0]
        return top1_accuracy([runner.run(b)[first] for b in self.full], list(self.calibration.label_batches()))

    def reference_accuracy(self) -> float | None:
        first = self.reference.output_names[0]
        return top1_accuracy([e[first] for e in self._expected], list(self.calibration.label_batches()))


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    types = _elem_types(model)
    for name in names:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False)
    except Exception:
        return {}
    return {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
