"""Every training recipe runs end to end for one epoch on a small subset, so none can break unseen.

These check that a recipe completes and writes its outputs, and that those outputs are
consistent (the folded ONNX model scores what the PyTorch model scores); accuracy on one epoch
of a few hundred images says nothing and is not asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--epochs", "1", "--subset", "160", "--rounds", "1", "--no-progress"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / script), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("script, extra", [
    ("train_baseline.py", ["--archs", "resnet20"]),
    ("train_layer_folding.py", []),
    ("train_eps_resnet.py", []),
    ("train_implosion.py", []),
    ("train_skip_fading.py", []),
])
def test_recipe_runs_one_epoch(tmp_path, script, extra):
    _run(script, *SMALL, "--out", str(tmp_path), *extra)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "table.md").read_text().startswith("## ")
    for row in results["rows"]:
        assert Path(row["folded_path"]).is_file()
        assert row["validation"].startswith("validation passed"), row["validation"]
        assert row["acc_onnx"] == pytest.approx(row["acc_torch"], abs=100.0 / 80 + 1e-9)  # one image of 80


@pytest.mark.parametrize("method", ["implosion", "epsilon", "layer-folding", "fade"])
def test_evaluation_runs_one_epoch(tmp_path, method):
    _run("train_evaluate.py", "--seeds", "0", "--jobs", "1", "--epochs", "1", "--depth", "8", "--width", "4",
         "--train", "128", "--val", "64", "--test", "64", "--methods", method, "--out", str(tmp_path))
    result = json.loads((tmp_path / "seed0.json").read_text())["results"]
    assert {"full", "shallow", method} <= set(result)
    assert result["shallow"]["depth"] < result["full"]["depth"]
    assert "**" in (tmp_path / "report.md").read_text()
    # every method's budget is measured against the baseline of the same seed
    assert result[method]["reference"] == result["full"]["val"]
    if method == "layer-folding":  # lambda chosen among the grid's runs, which all stay on record
        assert {"layer-folding/lam=0.25", "layer-folding/lam=0.5", "layer-folding/lam=1"} <= set(result)
        chosen = result[f"layer-folding/lam={result[method]['lam']:g}"]
        assert chosen["val"] == result[method]["val"] and chosen["removed"] == result[method]["removed"]
