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
