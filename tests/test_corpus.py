"""The models bundled with the onnx package, folded by the default pipeline (the CI subset of
``tools/corpus_run.py``): every run completes or refuses cleanly, the result passes the checker,
never has more nodes, and its outputs on the bundled inputs stay within 1e-5 relative of the
original's under onnxruntime (under onnx's reference evaluator where onnxruntime has no kernel).

All small cases (pytorch-converted, pytorch-operator, simple) run here; of the light
architectures the faster ones, with their bundled constant weights and with random ones.
``python tools/corpus_run.py`` runs all of them.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "corpus_run.py")
_spec = importlib.util.spec_from_file_location("corpus_run", TOOL)
corpus_run = sys.modules.setdefault("corpus_run", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(corpus_run)

# Light models in CI (seconds on 2 cores): the rest (AlexNet, VGG-19, ZFNet-512 evaluate their
# huge constant-filled fully connected weights at every run) are left to the full run.
FAST_LIGHT = {
    "light_squeezenet", "light_squeezenet[random weights]",
    "light_shufflenet", "light_shufflenet[random weights]",
    "light_inception_v1", "light_inception_v2[random weights]",
    "light_resnet50[random weights]",
    "light_densenet121[random weights]",
}
ALL_CASES = corpus_run.discover()
CI_CASES = [c for c in ALL_CASES if c.group != "light" or c.name in FAST_LIGHT]
_ROWS: dict[str, object] = {}


def row_of(case):
    """The case's row, folded once per session."""
    key = f"{case.group}/{case.name}"
    if key not in _ROWS:
        _ROWS[key] = corpus_run.run_case(case)
    return _ROWS[key]


def test_corpus_is_bundled():
    groups = {c.group for c in ALL_CASES}
    assert groups == set(corpus_run.GROUPS)
    assert sum(c.group == "light" and not c.random_weights for c in ALL_CASES) == 9
    assert len(ALL_CASES) >= 140
    assert corpus_run.real_alias_count() == 9
    assert FAST_LIGHT <= {c.name for c in ALL_CASES}


@pytest.mark.parametrize("case", CI_CASES, ids=[f"{c.group}/{c.name}" for c in CI_CASES])
def test_bundled_model(case):
    row = row_of(case)
    assert not row.note.startswith("crash"), row.note
    assert row.status in (corpus_run.OK, corpus_run.OK_REFERENCE, corpus_run.NOT_RUNNABLE), row.note
    assert row.nodes_after <= row.nodes_before
    if row.status == corpus_run.NOT_RUNNABLE:  # only the two Gradient (preview training domain) models
        assert "Gradient" in row.note, row.note
    else:
        assert row.err_original is not None and not row.changed, row.note
        if row.err_reference is not None:
            # Folded vs the bundled reference is no worse than the original vs it, up to rounding.
            assert row.err_reference <= row.reference_baseline + corpus_run.RTOL


def test_light_models_are_folded():
    """The corpus is not passed by doing nothing: the real architectures lose their BatchNorms."""
    case = next(c for c in ALL_CASES if c.name == "light_resnet50[random weights]")
    row = row_of(case)
    assert row.status == corpus_run.OK
    assert row.rewrites >= 53
    assert row.nodes_after <= row.nodes_before - 53
    assert 0 < row.err_original <= corpus_run.RTOL  # random weights: a real, small difference


def test_table_and_summary(capsys):
    code = corpus_run.main(["--groups", "simple,pytorch-converted", "--only", "single_relu,Conv2d_groups_thnn,GLU_dim"])
    out = capsys.readouterr().out
    assert code == 0
    assert "simple/test_single_relu_model" in out and "pytorch-converted/test_Conv2d_groups_thnn" in out
    assert "3 runs (3 bundled models, 0 light ones again with random weights" in out
    assert "3 processed (100.0%): 2 ok under onnxruntime, 1 ok under onnx's reference evaluator" in out
    assert "0 failed (0 crashes, 0 output changes" in out


def test_output_error():
    import numpy as np

    a = np.array([1.0, -2.0], np.float32)
    assert corpus_run.output_error(a, a) == (0.0, True)
    assert corpus_run.output_error(a, a + np.float32(1e-6))[1]
    assert not corpus_run.output_error(a, a + np.float32(1e-3))[1]
    assert corpus_run.output_error(a, a.astype(np.float64)) == (float("inf"), False)
    assert corpus_run.output_error([a, a], [a]) == (float("inf"), False)
    assert corpus_run.output_error(np.array(["x"]), np.array(["y"]))[1] is False


# --- the user's own models (--models DIR) -----------------------------------------------------

@pytest.fixture
def user_models(tmp_path):
    """resnet_bn, a sample-rate model whose sidecar gives sr, and a model whose check is weak."""
    import shutil

    import onnx

    from tests.test_validate import scaled_conv
    from tests.util import sample_rate_model

    shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx"), tmp_path)
    (tmp_path / "audio").mkdir()
    onnx.save(sample_rate_model(), str(tmp_path / "audio" / "vad.onnx"))
    (tmp_path / "audio" / "vad.json").write_text('{"input_value": ["sr:16000"]}')
    onnx.save(scaled_conv(5e-8), str(tmp_path / "tiny.onnx"))
    return tmp_path


def test_user_models_run_with_their_sidecars(user_models, capsys):
    import json

    code = corpus_run.main(["--models", str(user_models), "--json", str(user_models / "rows.json")])
    out = capsys.readouterr().out
    assert code == 0
    rows = {row["name"]: row for row in json.loads((user_models / "rows.json").read_text())}
    assert set(rows) == {"resnet_bn.onnx", os.path.join("audio", "vad.onnx"), "tiny.onnx"}
    assert all(row["status"] == corpus_run.OK and row["group"] == "user" for row in rows.values())
    assert rows[os.path.join("audio", "vad.onnx")]["rewrites"] == 1  # its BatchNorm, validated at sr=16000
    assert rows["tiny.onnx"]["note"] == "validation weak: y" and rows["resnet_bn.onnx"]["note"] == ""
    assert "3 models: 3 ok (1 of them with weak validation)" in out


def test_user_models_take_input_values_from_the_command_line(user_models, capsys):
    (user_models / "audio" / "vad.json").unlink()
    assert corpus_run.main(["--models", str(user_models / "audio")]) == 0
    out = capsys.readouterr().out  # folded, but onnxruntime cannot run it on random sample rates
    assert corpus_run.NOT_RUNNABLE in out and "--input-value" in out
    corpus_run.main(["--models", str(user_models / "audio"), "--input-value", "sr:16000"])
    assert "1 models: 1 ok" in capsys.readouterr().out


def test_user_models_bad_folder_or_sidecar(user_models, capsys):
    assert corpus_run.main(["--models", str(user_models / "absent")]) == 2
    assert capsys.readouterr().err.strip().endswith("no such folder")
    (user_models / "audio" / "vad.json").write_text('{"input_values": ["sr:16000"]}')
    assert corpus_run.main(["--models", str(user_models / "audio")]) == 2
    assert "unknown keys ['input_values']" in capsys.readouterr().err
