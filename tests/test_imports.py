"""A run imports only what it needs: each case starts a fresh interpreter, runs the CLI in it and
lists the modules it loaded. An exact ``--no-check`` fold needs neither onnxruntime nor the
approximate stage; no run of the CLI needs torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "models", "repvgg_small.onnx")

# What an exact fold without validation must not load: the runtime, the approximate stage and
# what only it uses, latency measurement and plotting.
NOT_FOR_EXACT_NO_CHECK = ["onnxruntime", "graphfold.approx", "graphfold.passes.approximate",
                          "graphfold.calibration", "graphfold.measure", "graphfold.bench", "matplotlib", "torch"]

_RUN_CLI = """
import json, sys
from graphfold.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded_modules(*args: str) -> tuple[int, set[str]]:
    """The CLI's exit code on ``args`` and every module loaded, in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _RUN_CLI, *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], set(result["modules"])


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_exact_no_check_run_imports_no_runtime_nor_approximate_stage(tmp_path):
    out = tmp_path / "out.onnx"
    code, modules = loaded_modules(SAMPLE, "-o", str(out), "--no-check", "-q")
    assert code == 0 and out.exists()
    assert [name for name in NOT_FOR_EXACT_NO_CHECK if _loaded(modules, name)] == []
    # The check can fail: the fold itself was loaded.
    assert "graphfold.passes.branches" in modules


def test_validated_run_loads_the_runtime_but_not_the_approximate_stage(tmp_path):
    code, modules = loaded_modules(SAMPLE, "-o", str(tmp_path / "out.onnx"), "-q")
    assert code == 0
    assert _loaded(modules, "onnxruntime")
    assert not _loaded(modules, "graphfold.approx") and not _loaded(modules, "graphfold.calibration")


@pytest.mark.parametrize("args", [
    ["{sample}", "-o", "{out}", "-q"],
    ["{sample}", "-o", "{out}", "-q", "--tolerance", "0.01", "--snap-slope", "0.99"],
    ["inspect", "{sample}", "-q"],
    ["check", "{sample}", "{sample}", "-q"],
], ids=["fold", "approximate", "inspect", "check"])
def test_cli_never_imports_torch(tmp_path, args):
    code, modules = loaded_modules(*[a.format(sample=SAMPLE, out=tmp_path / "out.onnx") for a in args])
    assert code == 0
    assert not _loaded(modules, "torch")


_SYMBOLIC_STATS = """
import json, sys
from tests.test_stats import shape_arithmetic_model, stats
macs = stats(shape_arithmetic_model(), {"x": [2, 3, 6, 10]})["macs"]
print(json.dumps({"macs": macs, "modules": sorted(sys.modules)}))
"""


def test_symbolic_shape_inference_does_not_import_torch():
    # onnxruntime.tools' __init__ imports torch whenever it is installed; graphfold loads the
    # symbolic inference module on its own. The MACs prove the inference ran.
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _SYMBOLIC_STATS], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["macs"] == 2 * 6 * 10 * (8 * 3 * 9 + 8 * 5)
    assert not _loaded(set(result["modules"]), "torch")
