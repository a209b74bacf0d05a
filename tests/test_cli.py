"""The command line end to end: results, exit codes, and one clear line for every bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from graphfold import __version__, kernels
from graphfold.cli import main
from tests.util import op_types

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx")
SCRIPT = shutil.which("graphfold", path=os.path.dirname(sys.executable))


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``graphfold ARGS`` in process: exit code, stdout, stderr."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --version, --help, bad options
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def work(tmp_path):
    """A folder holding a copy of the sample model as in.onnx."""
    shutil.copy(SAMPLE, tmp_path / "in.onnx")
    return tmp_path


def fingerprint(path) -> tuple[bytes, int]:
    return open(path, "rb").read(), os.stat(path).st_mtime_ns


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphfold: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def corrupt_batchnorm_folds(monkeypatch) -> None:
    right = kernels.bn_scale_shift
    monkeypatch.setattr(kernels, "bn_scale_shift", lambda *args: (right(*args)[0] * 1.5, right(*args)[1]))


# --- folding ----------------------------------------------------------------------------------

def test_fold(work, capsys):
    before = fingerprint(work / "in.onnx")
    code, out, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx")
    assert code == 0, err
    assert f"graphfold {__version__}:" in out and "fold-batchnorm" in out and "validation passed" in out
    assert err == ""
    model = onnx.load(str(work / "out.onnx"))
    assert "BatchNormalization" not in op_types(model)
    onnx.checker.check_model(model, full_check=True)
    assert fingerprint(work / "in.onnx") == before
    # Written atomically: nothing but the result is left beside it.
    assert sorted(os.listdir(work)) == ["in.onnx", "out.onnx"]


def test_fold_replaces_an_existing_output(work, capsys):
    (work / "out.onnx").write_bytes(b"stale")
    assert run(capsys, work / "in.onnx", "-o", work / "out.onnx", "-q")[0] == 0
    onnx.load(str(work / "out.onnx"))


def test_report(work, capsys):
    code, _, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--report", work / "r.json",
                       "--input-shape", "input:2,3,32,32")
    assert code == 0, err
    data = json.loads((work / "r.json").read_text())
    for side in ("before", "after"):
        assert set(data[side]) == {"nodes", "convs", "depth", "params", "macs", "file_bytes"}
    assert data["before"]["file_bytes"] == os.path.getsize(work / "in.onnx")
    assert data["after"]["file_bytes"] == os.path.getsize(work / "out.onnx")
    assert data["before"]["macs"] == 2 * 8831296
    assert data["rewrites"] and all({"pass_name", "nodes_removed", "nodes_added", "exact", "error_bound"}
                                    <= set(r) for r in data["rewrites"])
    validation = data["validation"]
    assert validation["passed"] is True and validation["max_rel"] <= 1e-5
    assert {"max_abs", "inputs"} <= set(validation)
    assert all(batch == {"input": [2, 3, 32, 32]} for batch in validation["inputs"])


def test_no_check(work, capsys):
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--no-check", "--report", work / "r.json")
    assert code == 0 and "validation skipped" in out
    assert json.loads((work / "r.json").read_text())["validation"] == {"passed": None, "skipped": True}


def test_passes_and_skip_passes(work, capsys):
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "a.onnx", "--passes", "fold-batchnorm,fold-affine")
    assert code == 0 and "fold-batchnorm" in out
    assert "BatchNormalization" not in op_types(onnx.load(str(work / "a.onnx")))
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "b.onnx", "--skip-passes", "fold-batchnorm")
    assert code == 0 and "fold-batchnorm" not in out
    assert op_types(onnx.load(str(work / "b.onnx"))).count("BatchNormalization") == 6


def test_list_passes(capsys):
    code, out, _ = run(capsys, "--list-passes")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0
    assert names[:5] == ["fold-constants", "remove-identity", "remove-dead-nodes", "fold-batchnorm", "fold-affine"]


def test_quiet(work, capsys):
    code, out, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "-q")
    assert (code, out, err) == (0, "", "")


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"graphfold {__version__}"


# --- validation failure -----------------------------------------------------------------------

def test_validation_failure_writes_no_model(work, capsys, monkeypatch):
    corrupt_batchnorm_folds(monkeypatch)
    code, out, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--report", work / "r.json")
    assert code == 1
    assert "validation FAILED" in out
    assert_one_error_line(err, "validation FAILED")
    assert not (work / "out.onnx").exists()
    # The report says why; it is the only thing written.
    assert json.loads((work / "r.json").read_text())["validation"]["passed"] is False
    assert sorted(os.listdir(work)) == ["in.onnx", "r.json"]


def test_validation_failure_keeps_an_existing_output(work, capsys, monkeypatch):
    corrupt_batchnorm_folds(monkeypatch)
    (work / "out.onnx").write_bytes(b"previous result")
    assert run(capsys, work / "in.onnx", "-o", work / "out.onnx", "-q")[0] == 1
    assert (work / "out.onnx").read_bytes() == b"previous result"


# --- bad input: exit 2, one line, nothing written ---------------------------------------------

def make_bad(work, kind: str) -> str:
    """An input model of the given kind of brokenness."""
    path = work / f"{kind}.onnx"
    if kind == "not-onnx":
        path.write_text("this is a README, not a model\n")
    elif kind == "truncated":
        path.write_bytes(open(SAMPLE, "rb").read()[:4000])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        model = onnx.load(SAMPLE)
        if kind == "checker":
            model.graph.node[0].input[0] = "no_such_tensor"
        elif kind == "opset":
            model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
        onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"),
    ("not-onnx", "not an ONNX model"),
    ("truncated", "not an ONNX model or truncated"),
    ("empty", "empty file"),
    ("checker", "invalid ONNX graph"),
    ("opset", f"opset {onnx.defs.onnx_opset_version() + 1}"),
])
def test_bad_input_model(work, capsys, kind, message):
    source = str(work / "missing.onnx") if kind == "missing" else make_bad(work, kind)
    code, out, err = run(capsys, source, "-o", work / "out.onnx", "--report", work / "r.json")
    assert code == 2
    assert_one_error_line(err, message)
    assert out == ""
    assert not (work / "out.onnx").exists() and not (work / "r.json").exists()


@pytest.mark.parametrize("where,message", [
    ("missing-folder", "does not exist"),
    ("parent-is-a-file", "is not a folder"),
    ("directory", "is a directory"),
    ("proc", "cannot write"),
])
def test_unwritable_output(work, capsys, where, message):
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    target = {"missing-folder": work / "nope" / "out.onnx", "parent-is-a-file": work / "in.onnx" / "out.onnx",
              "directory": work, "proc": "/proc/graphfold-test-out.onnx"}[where]
    before = fingerprint(work / "in.onnx")
    code, out, err = run(capsys, work / "in.onnx", "-o", target)
    assert code == 2
    assert_one_error_line(err, message)
    assert sorted(os.listdir(work)) == ["in.onnx"] and fingerprint(work / "in.onnx") == before


def test_unwritable_report_fails_before_any_work(work, capsys):
    code, _, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--report", work / "nope" / "r.json")
    assert code == 2
    assert_one_error_line(err, "does not exist")
    assert not (work / "out.onnx").exists()


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_output_equal_to_input_is_refused(work, capsys, spelling):
    os.symlink(work / "in.onnx", work / "link.onnx")
    source = work / ("link.onnx" if spelling == "symlink" else "in.onnx")
    target = {"same": work / "in.onnx", "dotted": work / "sub" / os.pardir / "in.onnx",
              "symlink": work / "in.onnx"}[spelling]
    before = fingerprint(work / "in.onnx")
    code, _, err = run(capsys, source, "-o", target)
    assert code == 2
    assert_one_error_line(err, "would overwrite the input")
    assert fingerprint(work / "in.onnx") == before


def test_report_equal_to_output_is_refused(work, capsys):
    code, _, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--report", work / "out.onnx")
    assert code == 2
    assert_one_error_line(err)
    assert not (work / "out.onnx").exists()


def test_report_equal_to_input_is_refused(work, capsys):
    before = fingerprint(work / "in.onnx")
    code, _, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--report", work / "in.onnx")
    assert code == 2
    assert_one_error_line(err, "would overwrite the input")
    assert fingerprint(work / "in.onnx") == before and not (work / "out.onnx").exists()


@pytest.mark.parametrize("args,message", [
    ([], "missing input model"),
    (["{in}"], "missing -o/--output"),
    (["{in}", "-o", "{out}", "--passes", "fold-everything"], "unknown pass 'fold-everything'"),
    (["{in}", "-o", "{out}", "--skip-passes", "nope"], "unknown pass 'nope'"),
    (["{in}", "-o", "{out}", "--input-shape", "input=1,3,32,32"], "bad --input-shape"),
    (["{in}", "-o", "{out}", "--input-shape", "image:1,3,32,32"], "no input of that name"),
    (["{in}", "-o", "{out}", "--input-shape", "input:1,3,64,64"], "fixes it at 32"),
    (["{in}", "-o", "{out}", "--input-shape", "input:1,3,32"], "rank 4"),
])
def test_usage_errors(work, capsys, args, message):
    argv = [a.format(**{"in": work / "in.onnx", "out": work / "out.onnx"}) for a in args]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_error_line(err, message)
    assert not (work / "out.onnx").exists()


# --- a bug or an interrupt: one line, nothing written -----------------------------------------

def test_a_failing_pass_is_an_internal_error(work, capsys, monkeypatch):
    from graphfold.passes.affine import FoldBatchNorm

    def broken(self, ctx, match, decision):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(FoldBatchNorm, "rewrite", broken)
    code, out, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx")
    assert code == 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("graphfold: internal error: pass 'fold-batchnorm' failed: RuntimeError: simulated bug")
    assert "nothing was written" in err and not (work / "out.onnx").exists()


def test_interrupt(work, capsys, monkeypatch):
    from graphfold import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Validation runs on the staged output file: interrupted there, the staging goes too.
    before = sorted(p.name for p in work.iterdir())
    monkeypatch.setattr(api, "compare_models", interrupted)
    code, _, err = run(capsys, work / "in.onnx", "-o", work / "out.onnx")
    assert code == 130 and err == "graphfold: interrupted; nothing was written\n"
    assert sorted(p.name for p in work.iterdir()) == before


# --- check and inspect ------------------------------------------------------------------------

def test_check(work, capsys, monkeypatch):
    assert run(capsys, work / "in.onnx", "-o", work / "good.onnx", "-q")[0] == 0
    code, out, _ = run(capsys, "check", work / "in.onnx", work / "good.onnx")
    assert code == 0 and "logits" in out and "validation passed" in out
    corrupt_batchnorm_folds(monkeypatch)
    assert run(capsys, work / "in.onnx", "-o", work / "bad.onnx", "--no-check", "-q")[0] == 0
    code, out, _ = run(capsys, "check", work / "in.onnx", work / "bad.onnx", "--seeds", "1")
    assert code == 1 and "MISMATCH" in out and "FAILED" in out


def test_check_bad_input(work, capsys):
    code, out, err = run(capsys, "check", work / "in.onnx", work / "absent.onnx")
    assert code == 2
    assert_one_error_line(err, "no such file")


def sample_with_a_bn_stat_input() -> onnx.ModelProto:
    """The sample with its stem BN's mean as a run-time input: that BN cannot fold."""
    model = onnx.load(SAMPLE)
    mean = next(n for n in model.graph.node if n.op_type == "BatchNormalization").input[3]
    init = next(i for i in model.graph.initializer if i.name == mean)
    model.graph.input.append(onnx.helper.make_tensor_value_info(mean, init.data_type, list(init.dims)))
    model.graph.initializer.remove(init)
    return model


def test_inspect_shows_declines_with_reasons(work, capsys):
    onnx.save(sample_with_a_bn_stat_input(), str(work / "stats_input.onnx"))
    code, out, _ = run(capsys, "inspect", work / "stats_input.onnx")
    assert code == 0
    assert "foldable (" in out and "left alone (" in out
    assert "BatchNormalization parameters are not float constants" in out
    code, out, _ = run(capsys, "inspect", work / "stats_input.onnx", "--json", "--passes", "fold-batchnorm")
    data = json.loads(out)
    assert len(data["rewrites"]) == 5
    assert [d["reason"] for d in data["declines"]] == ["BatchNormalization parameters are not float constants"]
    assert sorted(os.listdir(work)) == ["in.onnx", "stats_input.onnx"]


def test_inspect_bad_input(work, capsys):
    code, _, err = run(capsys, "inspect", make_bad(work, "truncated"))
    assert code == 2
    assert_one_error_line(err, "truncated")


# --- the installed console script -------------------------------------------------------------

def script(*args: str) -> subprocess.CompletedProcess:
    assert SCRIPT, "the graphfold console script is not installed next to this python"
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_script_bad_input_has_no_traceback(work):
    for source in (work / "absent.onnx", make_bad(work, "truncated")):
        result = script(source, "-o", work / "out.onnx")
        assert result.returncode == 2
        assert_one_error_line(result.stderr)
        assert result.stdout == "" and not (work / "out.onnx").exists()


def test_script_folds_verbosely(work):
    result = script(work / "in.onnx", "-o", work / "out.onnx", "-v")
    assert result.returncode == 0, result.stderr
    assert "DEBUG graphfold" in result.stderr and "Traceback" not in result.stderr
    assert "validation passed" in result.stdout
    assert "BatchNormalization" not in op_types(onnx.load(str(work / "out.onnx")))


def test_script_validation_failure_exit_code(work):
    # Folding can only fail validation through a bug; simulate one in a child interpreter.
    code = ("import sys; from graphfold import kernels, cli; right = kernels.bn_scale_shift; "
            "kernels.bn_scale_shift = lambda *a: (right(*a)[0] * 1.5, right(*a)[1]); "
            "sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, str(work / "in.onnx"), "-o", str(work / "out.onnx"), "-q"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "validation FAILED")
    assert not (work / "out.onnx").exists()


def test_bench_flag_prints_a_latency_comparison(work, capsys):
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--bench")
    assert code == 0
    table = out[out.index("median ms"):]
    rows = [line for line in table.splitlines()[1:3]]
    assert [row.split()[0] for row in rows] == [str(work / "in.onnx"), str(work / "out.onnx")]
    assert rows[0].split()[-3:] == ["1.000", "1.000", "baseline"]  # the input is the baseline
    assert rows[1].split()[-1] in ("tie", "faster", "slower")
    assert "verdict by CPU time ratio" in table


# --- command-line nits (issue 10) -------------------------------------------------------------

def test_global_options_work_before_a_subcommand(work, capsys):
    code, out, err = run(capsys, "-q", "check", work / "in.onnx", work / "in.onnx")
    assert (code, out, err) == (0, "", "")
    code, out, _ = run(capsys, "-v", "check", work / "in.onnx", work / "in.onnx", "--seeds", "1")
    assert code == 0 and "validation passed" in out


def test_inspect_names_unnamed_nodes_by_op_and_index(work, capsys):
    model = sample_with_a_bn_stat_input()
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(work / "unnamed.onnx"))
    code, out, _ = run(capsys, "inspect", work / "unnamed.onnx", "--passes", "fold-batchnorm")
    assert code == 0
    declined = out[out.index("left alone ("):].splitlines()[1:]
    assert declined and ", :" not in out
    assert all("BatchNormalization#" in line for line in declined), declined


def test_bench_json_into_a_closed_pipe_ends_quietly(work):
    assert SCRIPT, "the graphfold console script is not installed next to this python"
    child = subprocess.Popen([SCRIPT, "bench", str(work / "in.onnx"), "--json", "--rounds", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before anything is written, as `| head -0` would be
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) in (0, 141), err
    assert err == ""


def test_bench_plot_without_matplotlib_refuses_before_timing(work, capsys, monkeypatch):
    from graphfold import bench

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("benchmarked before refusing"))
    code, _, err = run(capsys, "bench", work / "in.onnx", "--plot", work / "b.png")
    assert code == 2
    assert_one_error_line(err, "matplotlib")
    assert not (work / "b.png").exists()


def test_unsorted_graph_message_is_not_cut_off(work, capsys):
    nodes = [onnx.helper.make_node("Relu", ["a"], ["b"]), onnx.helper.make_node("Relu", ["x"], ["a"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 2])],
                                   [onnx.helper.make_tensor_value_info("b", 1, [1, 2])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(work / "unsorted.onnx"))
    code, _, err = run(capsys, work / "unsorted.onnx", "-o", work / "out.onnx")
    assert code == 2
    assert_one_error_line(err, "topologically sorted", "is not output of any previous nodes")
    assert not (work / "out.onnx").exists()


def test_original_onnxruntime_cannot_run_points_at_no_check(work, capsys):
    # Reshape to a run-time shape input: onnxruntime fails on random shape values.
    nodes = [onnx.helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [2, 3]),
                                                onnx.helper.make_tensor_value_info("shape", 7, [2])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["a", "b"])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(work / "reshape.onnx"))
    code, _, err = run(capsys, work / "reshape.onnx", "-o", work / "out.onnx")
    assert code == 2
    assert_one_error_line(err, "onnxruntime cannot run the original", "--no-check", "--input-value")
    assert not (work / "out.onnx").exists()


# --- vacuous validation and --input-value (issue 10) ------------------------------------------

def test_vacuous_validation_warns_in_the_summary_and_report(work, capsys):
    from tests.test_validate import scaled_conv

    onnx.save(scaled_conv(5e-8), str(work / "tiny.onnx"))
    code, out, _ = run(capsys, work / "tiny.onnx", "-o", work / "out.onnx", "--report", work / "r.json")
    assert code == 0
    warning = next(line for line in out.splitlines() if line.startswith("warning: validation is weak"))
    assert "'y'" in warning and "--calibration" in warning and "--input-shape" in warning
    validation = json.loads((work / "r.json").read_text())["validation"]
    assert validation["weak"] is True and validation["weak_outputs"] == ["y"] and validation["source"] == "random"
    code, out, _ = run(capsys, "check", work / "tiny.onnx", work / "out.onnx")
    assert code == 0 and "warning: validation is weak" in out


def test_dynamic_dims_are_shown_in_the_summary(work, capsys):
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "out.onnx")
    assert code == 0 and "dynamic dims resolved as input:1x3x32x32 (give --input-shape to choose)" in out
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--input-shape", "input:2,3,32,32")
    assert code == 0 and "dynamic dims" not in out


def test_calibration_validates_the_exact_run(work, capsys):
    import numpy as np

    np.savez(work / "cal.npz", input=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    code, out, _ = run(capsys, work / "in.onnx", "-o", work / "out.onnx", "--calibration", work / "cal.npz",
                       "--report", work / "r.json")
    assert code == 0 and "validation passed on 1 calibration input(s)" in out
    assert json.loads((work / "r.json").read_text())["validation"]["source"] == "calibration"


def test_sample_rate_input_folds_and_validates_with_input_value(work, capsys):
    from tests.util import sample_rate_model

    onnx.save(sample_rate_model(), str(work / "vad.onnx"))
    code, _, err = run(capsys, work / "vad.onnx", "-o", work / "out.onnx")
    assert code == 2 and not (work / "out.onnx").exists()
    assert_one_error_line(err, "--input-value", "--no-check")
    code, out, _ = run(capsys, work / "vad.onnx", "-o", work / "out.onnx", "--input-value", "sr:16000")
    assert code == 0 and "validation passed" in out and "weak" not in out
    assert "BatchNormalization" not in op_types(onnx.load(str(work / "out.onnx")))
    code, out, _ = run(capsys, "check", work / "vad.onnx", work / "out.onnx", "--input-value", "sr:16000")
    assert code == 0 and "validation passed" in out
    code, out, _ = run(capsys, "bench", work / "vad.onnx", work / "out.onnx", "--input-value", "sr:16000",
                       "--rounds", "2")
    assert code == 0 and "sr:scalar" in out
    code, out, _ = run(capsys, "-q", "inspect", work / "vad.onnx", "--input-value", "sr:16000")
    assert code == 0 and out == ""


@pytest.mark.parametrize("value, message", [
    ("rate:16000", "no input of that name"), ("sr:16000.5", "cannot hold"), ("sr:1,2", "rank 0"),
    ("sr", "expected NAME:VALUE"), ("sr:loud", "is not a number"), ("sr:absent.npy", "cannot read"),
])
def test_bad_input_values_are_refused(work, capsys, value, message):
    from tests.util import sample_rate_model

    onnx.save(sample_rate_model(), str(work / "vad.onnx"))
    code, out, err = run(capsys, work / "vad.onnx", "-o", work / "out.onnx", "--report", work / "r.json",
                         "--input-value", value)
    assert code == 2 and out == ""
    assert_one_error_line(err, message)
    assert sorted(os.listdir(work)) == ["in.onnx", "vad.onnx"]
