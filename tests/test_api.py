"""The Python API: fold(model_or_path) -> (ModelProto, Report), inspect, check."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import graphfold
from graphfold import kernels
from graphfold.errors import UsageError, ValidationError
from tests.util import assert_same_outputs, op_types

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx")


@pytest.fixture(scope="module")
def sample() -> onnx.ModelProto:
    return onnx.load(SAMPLE)


@pytest.fixture(scope="module")
def folded_sample(sample):
    return graphfold.fold(sample, rtol=1e-5)


def corrupt_batchnorm_folds(monkeypatch) -> None:
    """Make fold-batchnorm compute wrong weights, as a bug in the algebra would."""
    right = kernels.bn_scale_shift
    monkeypatch.setattr(kernels, "bn_scale_shift", lambda *args: (right(*args)[0] * 1.5, right(*args)[1]))


# --- the ResNet exported from PyTorch ---------------------------------------------------------

def test_resnet_batchnorm_is_gone_and_outputs_match(sample, folded_sample):
    folded, report = folded_sample
    assert "BatchNormalization" in op_types(sample)
    assert "BatchNormalization" not in op_types(folded)
    assert report.counts()["fold-batchnorm"] == 6
    assert report.validation.passed and report.validation.max_rel <= 1e-5
    assert_same_outputs(sample, folded, rtol=1e-5, shapes={"input": [3, 3, 32, 32]})


def test_resnet_keeps_its_interface(sample, folded_sample):
    folded, _ = folded_sample
    assert folded.graph.input == sample.graph.input  # names, types, the symbolic batch
    assert [o.name for o in folded.graph.output] == ["logits"]
    assert folded.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert folded.opset_import == sample.opset_import and folded.ir_version == sample.ir_version
    assert folded.producer_name == sample.producer_name
    onnx.checker.check_model(folded, full_check=True)


def test_resnet_report(sample, folded_sample):
    _, report = folded_sample
    data = json.loads(report.to_json())
    for side in ("before", "after"):
        assert set(data[side]) == {"nodes", "convs", "depth", "params", "macs"}
    assert data["before"]["nodes"] > data["after"]["nodes"]
    assert data["before"]["params"] > data["after"]["params"]
    assert data["before"]["macs"] == data["after"]["macs"] == 8831296
    for rewrite in data["rewrites"]:
        assert {"pass_name", "nodes_removed", "nodes_added", "exact", "error_bound"} <= set(rewrite)
        assert rewrite["exact"] is True and rewrite["error_bound"] is None
    assert {"passed", "max_abs", "max_rel", "inputs"} <= set(data["validation"])
    assert data["validation"]["passed"] is True and data["validation"]["max_rel"] <= 1e-5
    assert data["input_shapes"] == {"input": [1, 3, 32, 32]}


def test_fold_from_a_path_equals_fold_from_a_model(sample, folded_sample):
    from_path, report = graphfold.fold(SAMPLE, check=False)
    assert from_path == folded_sample[0]
    assert report.validation is None


def test_fold_never_modifies_its_input(sample):
    before = sample.SerializeToString()
    graphfold.fold(sample, check=False)
    assert sample.SerializeToString() == before


def test_fold_with_nothing_to_do_returns_a_copy(folded_sample):
    folded = folded_sample[0]
    again, report = graphfold.fold(folded, passes=["fold-batchnorm", "fold-affine"])
    assert report.rewrites == [] and again == folded and again is not folded
    assert report.before == report.after


def test_input_shapes_reach_the_report_and_validation(sample):
    _, report = graphfold.fold(sample, passes=["fold-batchnorm"], input_shapes={"input": [2, 3, 32, 32]},
                               seeds=(0,))
    assert report.input_shapes == {"input": [2, 3, 32, 32]}
    assert report.before["macs"] == 2 * 8831296
    assert report.validation.inputs == [{"input": [2, 3, 32, 32]}]


def test_pass_selection(sample):
    kept, report = graphfold.fold(sample, skip_passes=["fold-batchnorm"], check=False)
    assert "fold-batchnorm" not in report.counts()
    assert op_types(kept).count("BatchNormalization") == 6
    _, report = graphfold.fold(sample, passes=["fold-batchnorm"], check=False)
    assert set(report.counts()) == {"fold-batchnorm"}
    with pytest.raises(UsageError, match="unknown pass 'fold-everything'"):
        graphfold.fold(sample, passes=["fold-everything"])


def test_progress_is_reported(sample):
    seen = []
    graphfold.fold(sample, passes=["fold-batchnorm"], seeds=(0,), progress=seen.append)
    assert any("fold-batchnorm" in text for text in seen) and any("validating" in text for text in seen)


def test_a_wrong_fold_raises_validation_error_with_the_report(sample, monkeypatch):
    corrupt_batchnorm_folds(monkeypatch)
    with pytest.raises(ValidationError) as info:
        graphfold.fold(sample)
    report = info.value.report
    assert isinstance(report, graphfold.Report) and report.validation is not None
    assert not report.validation.passed and report.validation.max_rel > 1e-3
    assert info.value.exit_code == 1


def test_unreadable_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        graphfold.fold(str(tmp_path / "absent.onnx"))


# --- inspect and check ------------------------------------------------------------------------

def test_inspect_lists_rewrites_and_declines(sample):
    report = graphfold.inspect(sample, passes=["fold-batchnorm", "fold-affine"])
    assert report.validation is None
    assert report.counts() == {"fold-batchnorm": 6}
    # The Gemm head's output feeds nothing foldable, the Adds have two layer inputs: nothing declined.
    assert report.declines == []


def test_inspect_shows_why(sample):
    model = onnx.load(SAMPLE)
    # Make the stem's BN statistics a run-time input: that BN can no longer fold.
    mean = next(n for n in model.graph.node if n.op_type == "BatchNormalization").input[3]
    init = next(i for i in model.graph.initializer if i.name == mean)
    model.graph.input.append(onnx.helper.make_tensor_value_info(mean, init.data_type, list(init.dims)))
    model.graph.initializer.remove(init)
    report = graphfold.inspect(model, passes=["fold-batchnorm"])
    assert report.counts() == {"fold-batchnorm": 5}
    assert [d.reason for d in report.declines] == ["BatchNormalization parameters are not float constants"]


def test_summary_reads_like_the_report(sample, folded_sample):
    _, report = folded_sample
    lines = report.summary().splitlines()
    assert lines[0].split() == ["before", "after", "change"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:6]}
    assert set(rows) == {"nodes", "convs", "depth", "params", "MACs"}
    assert rows["MACs"] == ["8.83M", "8.83M"] and rows["params"][0] == "20.28k"
    assert rows["nodes"][2].startswith("-") and rows["nodes"][2].endswith("%")
    assert "rewrites:" in lines and any(line.split() == ["fold-batchnorm", "6"] for line in lines)
    assert lines[-2].startswith("validation passed on 3 random input(s)")
    assert lines[-1] == "dynamic dims resolved as input:1x3x32x32 (give --input-shape to choose)"


def test_check(sample, folded_sample, monkeypatch):
    result = graphfold.check(sample, folded_sample[0], rtol=1e-5)
    assert isinstance(result, graphfold.ValidationResult) and result.passed
    corrupt_batchnorm_folds(monkeypatch)
    wrong, _ = graphfold.fold(sample, check=False)
    assert not graphfold.check(sample, wrong).passed
    feeds = [{"input": np.zeros((1, 3, 32, 32), np.float32)}]
    assert graphfold.check(SAMPLE, folded_sample[0], feeds=feeds).source == "calibration"


# --- the process's logging (issue 10) ---------------------------------------------------------

def test_fold_leaves_graphsurgeon_log_level_alone(sample):
    from onnx_graphsurgeon.logger import G_LOGGER

    before = G_LOGGER.severity
    try:
        G_LOGGER.severity = G_LOGGER.VERBOSE
        graphfold.fold(sample, check=False)
        assert G_LOGGER.severity == G_LOGGER.VERBOSE
    finally:
        G_LOGGER.severity = before


def test_fold_leaves_onnxruntime_log_level_alone():
    # onnxruntime has no getter for its global level: a child sets it to INFO, folds, then opens a
    # session, whose INFO lines must still appear.
    import subprocess
    import sys

    code = ("import onnxruntime as ort, graphfold, sys; ort.set_default_logger_severity(1); "
            "graphfold.fold(sys.argv[1]); ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    result = subprocess.run([sys.executable, "-c", code, SAMPLE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[I:onnxruntime" in result.stderr.splitlines()[-1]


# --- vacuous validation, input values (issue 10) ----------------------------------------------

def test_a_weak_validation_is_marked_in_the_report_and_summary():
    from tests.test_validate import scaled_conv

    _, report = graphfold.fold(scaled_conv(5e-8))
    data = report.to_dict()["validation"]
    assert data["passed"] and data["weak"] is True and data["weak_outputs"] == ["y"]
    assert "warning: validation is weak" in report.summary()
    _, report = graphfold.fold(scaled_conv(1.0))
    assert report.to_dict()["validation"]["weak"] is False and "weak" not in report.summary()


def test_calibration_validates_an_exact_run(sample, tmp_path):
    cal = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", input=cal)
    _, report = graphfold.fold(sample, calibration=str(tmp_path / "cal.npz"))
    assert report.validation.passed and report.validation.source == "calibration"
    assert [shapes["input"][0] for shapes in report.validation.inputs] == [16, 4]
    assert report.validation.rtol == 1e-4  # the exact check's tolerance, not an approximate one
    assert "validation passed on 2 calibration input(s)" in report.summary()


def test_dynamic_dims_are_shown_unless_given(sample):
    _, report = graphfold.fold(sample, check=False)
    assert "dynamic dims resolved as input:1x3x32x32 (give --input-shape to choose)" in report.notes
    _, report = graphfold.fold(sample, check=False, input_shapes={"input": [2, 3, 32, 32]})
    assert not any(note.startswith("dynamic dims") for note in report.notes)


def test_sample_rate_input_folds_with_input_values():
    from tests.util import sample_rate_model

    model = sample_rate_model()
    with pytest.raises(UsageError, match="--input-value"):
        graphfold.fold(model)
    folded, report = graphfold.fold(model, input_values={"sr": 16000})
    assert report.validation.passed and not report.validation.weak
    assert "BatchNormalization" not in op_types(folded)
    assert graphfold.check(model, folded, input_values={"sr": np.int64(16000)}).passed
    with pytest.raises(UsageError, match="no input of that name"):
        graphfold.fold(model, input_values={"rate": 16000})


def test_sample_rate_input_folds_with_calibration_and_input_values(tmp_path):
    from tests.util import sample_rate_model

    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32))
    _, report = graphfold.fold(sample_rate_model(), calibration=str(tmp_path / "cal.npz"),
                               input_values={"sr": 16000})
    assert report.validation.passed and report.validation.source == "calibration"


# --- options ----------------------------------------------------------------------------------

def test_options_object_and_keywords_are_one_request(sample):
    from graphfold.options import ApproxOptions, Options

    by_keywords = graphfold.fold(sample, fold_all=True, check=False)[0]
    by_object = graphfold.fold(sample, Options(fold_all=True, check=False))[0]
    assert by_object.SerializeToString() == by_keywords.SerializeToString()
    assert Options.of(tolerance=0.1, snap_slope=0.9).approx == ApproxOptions(tolerance=0.1, snap_slope=0.9)
    assert Options.of(approx_options=ApproxOptions(epsilon=1e-3)).approx.epsilon == 1e-3  # the older name


@pytest.mark.parametrize("call, message", [
    (lambda m, o: graphfold.fold(m, o.Options(), fold_all=True), "either an Options or keywords"),
    (lambda m, o: graphfold.fold(m, approx_options=o.ApproxOptions(tolerance=0.1), snap_slope=0.9),
     "approx=ApproxOptions"),
    (lambda m, o: graphfold.fold(m, approx=o.ApproxOptions(), approx_options=o.ApproxOptions()), "one option"),
    (lambda m, o: graphfold.inspect(m, o.Options(), tolerance=0.1), "either an Options or keywords"),
])
def test_an_option_said_two_ways_is_refused_not_overridden(sample, call, message):
    # approx_options once won silently over the one-by-one keywords beside it.
    from graphfold import options

    with pytest.raises(UsageError, match=message):
        call(sample, options)


def test_an_unknown_option_is_a_type_error(sample):
    with pytest.raises(TypeError, match="fold_everything"):
        graphfold.fold(sample, fold_everything=True)
