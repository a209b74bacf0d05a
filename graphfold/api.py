"""The Python API: ``fold``, ``inspect`` and ``check``; the CLI is a thin layer over these."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphfold.engine import FoldContext, FoldOptions, run_pipeline
from graphfold.errors import ValidationError
from graphfold.inputs import ShapeMap, resolve_shapes
from graphfold.io import load_model
from graphfold.passes import build_pipeline
from graphfold.report import Report
from graphfold.shapes import infer_concrete, infer_static
from graphfold.stats import model_stats
from graphfold.validate import DEFAULT_RTOL, DEFAULT_SEEDS, ValidationResult, compare_models

log = logging.getLogger(__name__)

ModelLike = "onnx.ModelProto | str"


def as_model(model: onnx.ModelProto | str) -> onnx.ModelProto:
    """A loaded, checked model from a ModelProto or a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(str(model))


def fold(model: onnx.ModelProto | str, *, passes: Sequence[str] | None = None, skip_passes: Sequence[str] = (),
         fold_all: bool = False, input_shapes: ShapeMap | None = None, check: bool = True,
         rtol: float = DEFAULT_RTOL, seeds: Sequence[int] = DEFAULT_SEEDS,
         progress: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, Report]:
    """Fold ``model`` and, unless ``check`` is False, validate the result against it.

    Returns the optimized model and its ``Report``. Raises ``ValidationError`` (carrying the
    report as ``.report``) when the result does not match the original, ``UsageError`` for
    bad input. The input model is never modified.
    """
    original = as_model(model)
    pipeline = build_pipeline(passes, skip_passes)
    concrete = infer_concrete(original, input_shapes)
    report = Report(before=model_stats(original, concrete), after={},
                    input_shapes=_safe_resolve(original, input_shapes))
    graph = gs.import_onnx(original)
    ctx = FoldContext(graph, FoldOptions(fold_all=fold_all), infer_static(original), concrete)
    report.rewrites = run_pipeline(ctx, pipeline, progress)
    report.declines = list(ctx.declines)
    folded = export(graph, original) if report.rewrites else _copy(original)
    report.after = model_stats(folded, infer_concrete(folded, input_shapes))
    if check:
        report.validation = compare_models(original, folded, input_shapes=input_shapes, seeds=seeds,
                                           rtol=rtol, progress=progress)
        if not report.validation.passed:
            error = ValidationError(report.validation.summary())
            error.report = report
            raise error
    return folded, report


def inspect(model: onnx.ModelProto | str, *, passes: Sequence[str] | None = None,
            skip_passes: Sequence[str] = (), fold_all: bool = False,
            input_shapes: ShapeMap | None = None) -> Report:
    """What ``fold`` would do: its rewrites and every decline with its reason; nothing is validated."""
    return fold(model, passes=passes, skip_passes=skip_passes, fold_all=fold_all,
                input_shapes=input_shapes, check=False)[1]


def check(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, *,
          input_shapes: ShapeMap | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          rtol: float = DEFAULT_RTOL, feeds: Iterable[Mapping[str, np.ndarray]] | None = None) -> ValidationResult:
    """Compare two models' outputs under onnxruntime on the same inputs."""
    return compare_models(as_model(reference), as_model(candidate), input_shapes=input_shapes,
                          seeds=seeds, rtol=rtol, feeds=feeds)


def export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The folded graph as a model carrying the original's model-level fields."""
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = original.ir_version
    del out.opset_import[:]
    out.opset_import.extend(original.opset_import)
    for field_name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field_name, getattr(original, field_name))
    del out.metadata_props[:]
    out.metadata_props.extend(original.metadata_props)
    if not out.functions and original.functions:
        out.functions.extend(original.functions)
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _safe_resolve(model: onnx.ModelProto, input_shapes: ShapeMap | None) -> dict[str, list[int]]:
    try:
        return resolve_shapes(model, input_shapes)
    except Exception:
        return {}
