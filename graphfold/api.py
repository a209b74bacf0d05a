"""The Python API: ``fold``, ``fold_file``, ``inspect`` and ``check``; the CLI is a thin layer over these."""
from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphfold.engine import FoldContext, FoldOptions, run_pipeline
from graphfold.errors import UsageError, ValidationError
from graphfold.exporter import export_model
from graphfold.external import Spill, has_external_refs
from graphfold.inputs import (ShapeMap, check_input_shapes, dynamic_inputs, fit_input_values, resolve_shapes,
                              shapes_text, value_shapes)
from graphfold.io import ensure_writable, load_model, load_model_sized, save_model
from graphfold.mapped import DetachedModel
from graphfold.options import Options
from graphfold.passes import build_pipeline
from graphfold.passes.cleanup import quiet_graphsurgeon
from graphfold.refit import RefitOptions
from graphfold.report import Report
from graphfold.shapes import infer_concrete, infer_static
from graphfold.stats import model_stats
from graphfold.validate import DEFAULT_RTOL, DEFAULT_SEEDS, ValidationResult, compare_models

log = logging.getLogger(__name__)


def as_model(model: onnx.ModelProto | str) -> onnx.ModelProto:
    """A loaded, checked model from a ModelProto or a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(str(model))


def fold(model: onnx.ModelProto | str, options: Options | None = None, /,
         **keywords) -> tuple[onnx.ModelProto, Report]:
    """Fold ``model`` and, unless told not to, validate the result against it.

    ``options`` is an ``Options``, or its fields come as keywords (``fold(model, fold_all=True,
    input_shapes={"input": [1, 3, 224, 224]})``), one or the other; the approximate stage's may
    also come one by one (``tolerance=``, ``snap_slope=``, ``epsilon=``...). See ``Options``.

    Returns the optimized model and its ``Report``. Raises ``ValidationError`` (carrying the
    report as ``.report``) when the result does not match the original, ``UsageError`` for
    bad input. The input model is never modified. To fold a file into another, ``fold_file``
    is faster and lighter.
    """
    return _fold(model, None, Options.of(options, **keywords))


def fold_file(source: str | os.PathLike, output: str | os.PathLike, options: Options | None = None, /,
              **keywords) -> Report:
    """``fold(source, options)`` written to ``output`` (with ``<name>.data`` beside it if over
    2 GB), atomically and only once it validated: a failed validation raises ``ValidationError``
    and writes nothing. Returns the report.

    The way to fold a model file (the command line's): validation runs on the file as written,
    and the weights are read from the input through a memory map and streamed to the output,
    never copied into protobuf messages: faster than ``fold`` and saving, with the model in
    memory about once instead of several times. ``output`` may not be ``source``: the input is
    never modified.
    """
    source, output = os.fspath(source), os.fspath(output)
    opts = Options.of(options, **keywords)
    ensure_writable(output, source)
    return _fold(source, output, opts)[1]


def inspect(model: onnx.ModelProto | str, options: Options | None = None, /, **keywords) -> Report:
    """What ``fold`` would do: its rewrites and every decline with its reason. Nothing is
    validated, except that approximate rewrites, if asked for, are measured."""
    return _fold(model, None, replace(Options.of(options, **keywords), check=False), report_only=True)[1]


@quiet_graphsurgeon()  # graphsurgeon prints warnings (bfloat16 weights...) to stdout while importing
def _fold(model: onnx.ModelProto | str, output: str | None, options: Options,
          report_only: bool = False) -> tuple[onnx.ModelProto | None, Report]:
    """``fold``; with ``output``, the result is saved there (validated as saved) and not returned;
    ``report_only`` (``inspect``): no model is built for an unvalidated run, only its report."""
    options.approx.check()
    exact = options.exact
    # An exact run reads a file's large weights in place (mapped.py); the approximate stages
    # copy and run models throughout, and get an ordinary one.
    original, on_disk = (model, None) if isinstance(model, onnx.ModelProto) else \
        load_model_sized(str(model), detach=exact)
    arrays = None
    if isinstance(original, DetachedModel):
        original, arrays = original.proto, original.arrays
    check_input_shapes(original, options.input_shapes)
    values = fit_input_values(original, options.input_values, options.input_shapes)
    input_shapes = value_shapes(values, options.input_shapes)
    source = frozen_initializer_inputs(original) if options.freeze_initializer_inputs else original
    pipeline = build_pipeline(options.passes, options.skip_passes)
    concrete = infer_concrete(original, input_shapes)
    report = Report(before=model_stats(original, concrete), after={},
                    input_shapes=_safe_resolve(original, input_shapes))
    if on_disk is not None:
        report.before["file_bytes"] = on_disk
    data = None  # calibration data, when the approximate stage ran
    if options.refit:
        folded, data = _fold_refit(source, report, options, input_shapes, values)
    elif not exact:
        folded, data = _fold_approximate(source, report, options, input_shapes, values)
    else:
        folded, report.rewrites, report.declines = _fold_exact(source, pipeline, options.fold_all, input_shapes,
                                                               options.progress, concrete, arrays)
    proto = folded.proto if isinstance(folded, DetachedModel) else folded
    report.after = model_stats(proto, infer_concrete(proto, input_shapes))
    overridable = overridable_initializers(source)
    if overridable:
        report.notes.append(f"{len(overridable)} initializer(s) are also graph inputs, which a caller may feed "
                            f"at run time ({', '.join(overridable[:3])}{', ...' if len(overridable) > 3 else ''}): "
                            "they were kept as inputs and not folded; --freeze-initializer-inputs folds them")
    open_inputs = dynamic_inputs(original, input_shapes)
    if open_inputs and all(name in report.input_shapes for name in open_inputs):
        shapes = shapes_text({name: report.input_shapes[name] for name in open_inputs})
        report.notes.append(f"dynamic dims resolved as {shapes} (give --input-shape to choose)")
    reference_path = None if model is original else os.fspath(model)

    def validate(candidate: onnx.ModelProto, candidate_path: str | None = None) -> None:
        # Real calibration data beats random inputs for an exact run too.
        feeds = data.batches() if data is not None and not data.is_random else None
        try:
            report.validation = compare_models(original, candidate, input_shapes=input_shapes, seeds=options.seeds,
                                               rtol=options.rtol, progress=options.progress, input_values=values,
                                               feeds=feeds, reference_path=reference_path,
                                               candidate_path=candidate_path)
        except UsageError as exc:
            raise UsageError(f"{exc}; --no-check (check=False) folds without validating") from None
        if not report.validation.passed:
            error = ValidationError(report.validation.summary())
            error.report = report
            raise error

    validating = options.check and report.validation is None
    arrays = None  # the result holds the weights it needs
    if report_only and not validating:
        return None, report
    if output is not None:
        def verify(staged: str) -> None:
            if isinstance(folded, DetachedModel):
                # Written: its weights need not stay in memory while onnxruntime loads both models.
                folded.arrays.clear()
            validate(proto, staged)

        report.after["file_bytes"] = save_model(folded, output, verify=verify if validating else None)
        return None, report
    if isinstance(folded, DetachedModel):
        folded = folded.materialize()
    if validating:
        validate(folded)
    return folded, report


def _fold_exact(original: onnx.ModelProto, pipeline: Sequence, fold_all: bool, input_shapes: ShapeMap | None,
                progress: Callable[[str], None] | None, concrete: Mapping | None = None,
                arrays: Mapping[str, np.ndarray] | None = None):
    """The exact pipeline on ``original``: the folded model, its rewrites and the last round's declines.

    ``arrays``: the values of ``original``'s detached tensors (mapped.py); the folded model is
    then a ``DetachedModel`` too, whose weights, computed or unchanged, are arrays.
    """
    graph = gs.import_onnx(original)
    _keep_overridable(graph, original)
    if arrays:
        _give_values(graph, arrays)
    concrete = concrete if concrete is not None else infer_concrete(original, input_shapes)
    ctx = FoldContext(graph, FoldOptions(fold_all=fold_all), infer_static(original), concrete)
    if has_external_refs(original):
        ctx.scope.spill = Spill()  # lives until the process ends: the result refers to it
    rewrites = run_pipeline(ctx, pipeline, progress)
    if arrays is None:
        folded = export(graph, original) if rewrites else _copy(original)
    else:
        folded = export_detached(graph, original, arrays) if rewrites else DetachedModel(_copy(original), dict(arrays))
    declines = list(ctx.declines)
    # A graphsurgeon graph is a web of reference cycles holding every weight, old and new: free
    # it now rather than whenever the cyclic collector runs, or the next model folded (or the
    # save that follows) finds it still in memory. A full collection costs time in proportion to
    # the process's objects (0.1 s in a program that has torch loaded), so only where the weights
    # are worth it.
    del ctx, graph
    if _weight_elements(original) >= COLLECT_ELEMENTS:
        gc.collect()
    return folded, rewrites, declines


def _give_values(graph: gs.Graph, arrays: Mapping[str, np.ndarray]) -> None:
    """The detached tensors' values, as graphsurgeon imported them without."""
    # A function of its own: a loop variable left in _fold_exact's frame would keep the whole
    # graph alive (its tensors and nodes link each other) past the collection that frees it.
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) and name in arrays:
            tensor.values = arrays[name]


# Weights (elements) above which a fold frees graphsurgeon's graph at once (4M floats: 16 MB).
COLLECT_ELEMENTS = 2**22


def _weight_elements(model: onnx.ModelProto) -> int:
    """Elements in the main graph's initializers, from their dims (no weight is read)."""
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def _calibrated(original: onnx.ModelProto, report: Report, options: Options, input_shapes: ShapeMap | None,
                values: Mapping[str, np.ndarray]):
    """What the approximate and refit stages start from: the calibration data (its summary goes
    into the report) and the exact pipeline as a function of a model, which they rerun."""
    from graphfold.calibration import load_calibration

    data = load_calibration(options.calibration, original, labels=options.labels, input_shapes=input_shapes,
                            input_values=values)
    report.calibration = data.info()

    def exact(model: onnx.ModelProto):
        return _fold_exact(model, build_pipeline(options.passes, options.skip_passes), options.fold_all,
                           input_shapes, None)

    return data, exact


def _fold_approximate(original: onnx.ModelProto, report: Report, options: Options, input_shapes: ShapeMap | None,
                      values: Mapping[str, np.ndarray]):
    """The exact pipeline plus the measured approximate stage; fills the report's approximate fields.
    Returns the model and the calibration data."""
    # Imported here: an exact run needs none of the stage (calibration, measurement, onnxruntime).
    from graphfold.approx import ApproximateStage

    data, exact = _calibrated(original, report, options, input_shapes, values)
    stage = ApproximateStage(original, options.approx, data, exact, export, input_shapes, options.fold_all,
                             options.progress)
    outcome = stage.run()
    report.rewrites, report.declines = outcome.rewrites, outcome.declines
    report.approximate, report.accuracy = outcome.info, outcome.accuracy
    report.notes.extend(data.notes + outcome.info.get("notes", []))
    if outcome.validation is not None:
        report.validation = outcome.validation
        report.notes.append(f"validated on the {data.samples} calibration samples at --tolerance "
                            f"{options.approx.tolerance:g}, not on random inputs: the result is approximate")
    return outcome.model, data


def _fold_refit(original: onnx.ModelProto, report: Report, options: Options, input_shapes: ShapeMap | None,
                values: Mapping[str, np.ndarray]):
    """The exact pipeline, then the refit stage on its result, validated on the holdout.
    Returns the model and the calibration data."""
    refit = options.refit if isinstance(options.refit, RefitOptions) else RefitOptions()
    refit.check()
    approx = options.approx
    if options.calibration is None:
        raise UsageError("--refit needs --calibration FILE.npz: it fits weights to real inputs, and random "
                         "inputs would fit the network to noise")
    if approx.snap_slope is not None or approx.epsilon is not None or approx.drop_branches or approx.allow_border:
        raise UsageError("--refit does not combine with --snap-slope, --epsilon, --drop-branches or "
                         "--allow-border; run them separately")
    from graphfold.refit.stage import RefitStage  # heavy: only when asked for

    data, exact = _calibrated(original, report, options, input_shapes, values)
    base, base_rewrites, _ = exact(original)
    stage = RefitStage(original, base, data, refit, exact, tolerance=approx.tolerance,
                       target_depth=approx.target_depth, input_shapes=input_shapes, progress=options.progress)
    outcome = stage.run()
    report.rewrites, report.declines = base_rewrites + outcome.rewrites, outcome.declines
    report.refit, report.accuracy, report.validation = outcome.info, outcome.accuracy, outcome.validation
    report.notes.extend(data.notes)
    if not outcome.validation.passed:
        error = ValidationError(outcome.validation.summary())
        error.report = report
        raise error
    return outcome.model, data


def check(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, *,
          input_shapes: ShapeMap | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          rtol: float = DEFAULT_RTOL, feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
          input_values: Mapping[str, object] | None = None) -> ValidationResult:
    """Compare two models' outputs under onnxruntime on the same inputs (``feeds``, else seeded
    random ones with ``input_values`` for their inputs, as in ``fold``)."""
    reference = as_model(reference)
    check_input_shapes(reference, input_shapes)
    values = fit_input_values(reference, input_values, input_shapes)
    return compare_models(reference, as_model(candidate), input_shapes=value_shapes(values, input_shapes),
                          seeds=seeds, rtol=rtol, feeds=feeds, input_values=values)


def export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The folded graph as a model carrying the original's model-level fields."""
    return _export(graph, original)


def export_detached(graph: gs.Graph, original: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> DetachedModel:
    """``export``, with large weights left as arrays (``original``'s detached ones: ``arrays``)."""
    detached: dict[str, np.ndarray] = {}
    out = _export(graph, original, detached)
    # Overridable initializers come back from the original as headers: their values too.
    for init in out.graph.initializer:
        if init.name in arrays and init.name not in detached and not init.HasField("raw_data"):
            detached[init.name] = arrays[init.name]
    return DetachedModel(out, detached)


def _export(graph: gs.Graph, original: onnx.ModelProto, detached: dict[str, np.ndarray] | None = None):
    _storable_strings(graph)
    out = export_model(graph, detached)
    out.ir_version = original.ir_version
    del out.opset_import[:]
    out.opset_import.extend(original.opset_import)
    for field_name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field_name, getattr(original, field_name))
    del out.metadata_props[:]
    out.metadata_props.extend(original.metadata_props)
    if not out.functions and original.functions:
        out.functions.extend(original.functions)
    if out.ir_version < 4:
        _initializers_as_inputs(out.graph)
    else:
        _restore_overridable(out, original)
    return out


def _storable_strings(graph: gs.Graph) -> None:
    """graphsurgeon writes a constant whose values were read (or computed) as raw data, which ONNX
    forbids for strings: give it string tensors as TensorProtos again."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    constants += [a for node in graph.nodes for a in node.attrs.values() if isinstance(a, gs.Constant)]
    for tensor in constants:
        if _is_text(tensor.dtype):
            tensor.to_constant(LazyValues(numpy_helper.from_array(np.asarray(tensor.values), tensor.name)))
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _storable_strings(attr)


def _is_text(dtype) -> bool:
    try:
        return np.dtype(dtype).kind in "OSU"
    except TypeError:  # an ONNX type numpy lacks (bfloat16...)
        return False


def frozen_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose overridable initializers are plain constants (no longer inputs)."""
    names = set(overridable_initializers(model))
    if not names:
        return model
    frozen = _copy(model)
    kept = [vi for vi in frozen.graph.input if vi.name not in names]
    del frozen.graph.input[:]
    frozen.graph.input.extend(kept)
    return frozen


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs. From IR version 4 on, a caller may feed them at run
    time (onnxruntime treats them so): they are inputs with a default value, not constants."""
    if model.ir_version < 4:
        return []
    inputs = {vi.name for vi in model.graph.input}
    return [init.name for init in model.graph.initializer if init.name in inputs]


def _keep_overridable(graph: gs.Graph, original: onnx.ModelProto) -> None:
    """Make overridable initializers graph inputs again (graphsurgeon imports them as constants),
    so that no pass folds them; ``export`` gives them back their default values."""
    names = overridable_initializers(original)
    if not names:
        return
    tensors = graph.tensors()
    for name in names:
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Constant):
            tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
            if not hasattr(tensor, "type"):
                tensor.type = "tensor_type"  # graphsurgeon's to_variable leaves it unset; its export reads it
            graph.inputs.append(tensor)
    order = {vi.name: index for index, vi in enumerate(original.graph.input)}
    graph.inputs.sort(key=lambda t: order.get(t.name, len(order)))


def _restore_overridable(out: onnx.ModelProto, original: onnx.ModelProto) -> None:
    names = set(overridable_initializers(original))
    if not names:
        return
    present = {init.name for init in out.graph.initializer}
    inputs = {vi.name for vi in out.graph.input}
    out.graph.initializer.extend(init for init in original.graph.initializer
                                 if init.name in names and init.name in inputs and init.name not in present)


def _initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR versions before 4 require every initializer to be a graph input too (graphsurgeon
    drops them from the inputs, and folds make new ones): list them after the real inputs."""
    listed = {vi.name for vi in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _initializers_as_inputs(sub)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _safe_resolve(model: onnx.ModelProto, input_shapes: ShapeMap | None) -> dict[str, list[int]]:
    try:
        return resolve_shapes(model, input_shapes)
    except Exception:
        return {}
