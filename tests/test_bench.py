"""graphfold.bench: structure of the results, never the times themselves."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold import bench as bench_module
from graphfold import io as model_io
from graphfold.bench import BenchResult, ModelTiming, bench, plot
from graphfold.errors import UsageError

FAST = dict(rounds=3, warmup=1, repeat=2)


def conv_model(channels: int = 4, kernel: int = 3, input_name: str = "x",
               batch: int | str = 1, size: int | str = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(
        rng.standard_normal((channels, 3, kernel, kernel)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")
    pad = kernel // 2
    node = helper.make_node("Conv", [input_name, "w", "b"], ["y"], pads=[pad] * 4)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, size, size])],
        [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_paths(tmp_path):
    paths = []
    for kernel in (1, 3):
        path = tmp_path / f"conv{kernel}.onnx"
        onnx.save(conv_model(kernel=kernel), str(path))
        paths.append(str(path))
    return paths


def test_result_structure(model_paths):
    calls = []
    result = bench(model_paths, progress=lambda done, total: calls.append((done, total)), **FAST)
    assert isinstance(result, BenchResult)
    assert [t.path for t in result.timings] == model_paths
    assert result.provider == "cpu" and result.threads == 1 and result.rounds == 3
    assert result.batch is None
    assert result.input_shapes == {"x": [1, 3, 8, 8]}
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for timing in result.timings:
        assert isinstance(timing, ModelTiming)
        assert len(timing.samples_ms) == 3
        assert timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert result.timings[0].ratio == 1.0
    second = result.timings[1]
    assert second.ratio == pytest.approx(second.median_ms / result.timings[0].median_ms)


def test_to_dict_is_json(model_paths):
    data = bench(model_paths, **FAST).to_dict()
    assert set(data) == {"timings", "provider", "threads", "batch", "rounds", "input_shapes", "spread_limit",
                         "warnings"}
    assert set(data["timings"][0]) == {"path", "median_ms", "min_ms", "p10_ms", "p90_ms", "spread", "samples_ms",
                                       "ratio", "cpu_ms", "cpu_ratio", "verdict"}
    assert json.loads(json.dumps(data)) == data


def test_format_table(model_paths):
    table = bench(model_paths, **FAST).format_table()
    lines = table.splitlines()
    assert lines[1].split()[1:] == ["min", "ms", "median", "ms", "p10-p90", "ms", "spread", "ratio", "cpu", "ratio",
                                    "verdict"]
    assert "x:1x3x8x8" in lines[0]
    for path, line in zip(model_paths, lines[2:4]):
        assert line.startswith(path)
    assert lines[2].split()[-3:] == ["1.000", "1.000", "baseline"]
    assert lines[4] == "verdict by CPU time ratio; within 5% of 1 is a tie"


class FakeClocks:
    """Wall-clock and CPU clocks that advance by scripted amounts per timed sample."""

    def __init__(self, wall_ms, cpu_ms) -> None:
        self.wall = self._clock(wall_ms)
        self.cpu = self._clock(cpu_ms)

    @staticmethod
    def _clock(steps_ms):
        # Each clock is read at the start and at the end of a sample: it advances on the end.
        steps, now, reads = iter(steps_ms), 0.0, 0

        def read() -> float:
            nonlocal now, reads
            reads += 1
            if reads % 2 == 0:
                now += next(steps) / 1000
            return now
        return read


def fake_bench(monkeypatch, paths, wall_ms, cpu_ms, **kw):
    clocks = FakeClocks(wall_ms, cpu_ms)
    monkeypatch.setattr(bench_module, "wall_clock", clocks.wall)
    monkeypatch.setattr(bench_module, "cpu_clock", clocks.cpu)
    return bench(paths, rounds=10, warmup=1, repeat=1, **kw)


def test_wide_spread_warns_in_text_and_json(model_paths, monkeypatch):
    # Round r times model (r + i) % 2 in slot i; every other round a neighbour steals the core.
    wall = [1.0 if r % 2 else 3.0 for r in range(10) for _ in range(2)]
    result = fake_bench(monkeypatch, model_paths, wall, [1.0] * 20)
    assert all(t.spread == pytest.approx(3.0) for t in result.timings)
    assert all(t.min_ms == pytest.approx(1.0) for t in result.timings)
    [warning] = result.warnings
    assert "spread too wide" in warning and model_paths[0] in warning and model_paths[1] in warning
    assert f"warning: {warning}" in result.format_table()
    assert json.loads(json.dumps(result.to_dict()))["warnings"] == [warning]


def test_steady_timings_do_not_warn(model_paths, monkeypatch):
    result = fake_bench(monkeypatch, model_paths, [2.0] * 20, [2.0] * 20)
    assert result.warnings == [] and "warning" not in result.format_table()
    assert [t.verdict for t in result.timings] == ["baseline", "tie"]


def test_cpu_ratio_decides_the_verdict_on_one_thread(model_paths, monkeypatch):
    # Wall clock says equal (the machine was busy); the CPU time this process spent says 30% less.
    rounds = [(r + i) % 2 for r in range(10) for i in range(2)]  # which model each sample times
    result = fake_bench(monkeypatch, model_paths, [2.0] * 20, [1.0 if m == 0 else 0.7 for m in rounds])
    second = result.timings[1]
    assert second.ratio == pytest.approx(1.0) and second.cpu_ratio == pytest.approx(0.7)
    assert second.verdict == "faster"


def test_no_cpu_ratio_with_several_threads(model_paths, monkeypatch):
    result = fake_bench(monkeypatch, model_paths, [2.0] * 20, [3.0] * 20, threads=2)
    assert [t.cpu_ratio for t in result.timings] == [None, None]
    assert "verdict by median ratio" in result.format_table()


def test_model_protos_and_single_model():
    result = bench([conv_model(kernel=1), conv_model(kernel=3)], **FAST)
    assert [t.path for t in result.timings] == ["model[0] conv", "model[1] conv"]
    alone = bench([conv_model()], **FAST)
    assert len(alone.timings) == 1 and alone.timings[0].ratio == 1.0


def test_large_proto_goes_through_external_data(monkeypatch, caplog):
    # Pretend the 2 GB protobuf limit is tiny so the external-data path runs on a small model.
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10)
    model = conv_model(channels=64)  # a weight over onnx's 1 KB external-data threshold
    before = model.SerializeToString()
    with caplog.at_level("INFO", logger="graphfold.bench"):
        result = bench([model], **FAST)
    assert "external data" in caplog.text
    assert result.timings[0].ratio == 1.0
    assert model.SerializeToString() == before  # the caller's proto keeps its weights


def test_batch_override_with_dynamic_batch():
    result = bench([conv_model(batch="N")], batch=4, **FAST)
    assert result.input_shapes == {"x": [4, 3, 8, 8]}
    assert result.batch == 4


def test_input_shapes_override():
    result = bench([conv_model(batch="N", size="S")], input_shapes={"x": [2, 3, 16, 16]}, **FAST)
    assert result.input_shapes == {"x": [2, 3, 16, 16]}


def test_input_shape_the_model_refuses():
    with pytest.raises(UsageError):
        bench([conv_model()], input_shapes={"x": [1, 3, 16, 16]}, **FAST)


def test_model_that_fails_to_run_is_usage_error():
    # Reshape of 4 values to 5: onnxruntime refuses it when loading or running, never silently.
    shape = numpy_helper.from_array(np.array([5], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="onnxruntime cannot (load|run)"):
        bench([model], **FAST)


def test_mismatched_inputs_rejected():
    with pytest.raises(UsageError, match="same input names"):
        bench([conv_model(input_name="x"), conv_model(input_name="image")], **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(provider="tpu"), "unknown provider"),
    (dict(opt_level="max"), "unknown opt level"),
    (dict(rounds=0), "rounds must be"),
    (dict(threads=0), "threads must be"),
])
def test_bad_settings_rejected(kwargs, message):
    with pytest.raises(UsageError, match=message):
        bench([conv_model()], **kwargs)


def test_missing_file_and_empty_list(tmp_path):
    with pytest.raises(UsageError, match="no such model"):
        bench([str(tmp_path / "absent.onnx")])
    with pytest.raises(UsageError, match="at least one"):
        bench([])


def test_cuda_unavailable_is_usage_error(monkeypatch):
    monkeypatch.setattr(bench_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UsageError, match="CUDAExecutionProvider"):
        bench([conv_model()], provider="cuda", **FAST)
    assert bench([conv_model()], provider="auto", **FAST).provider == "cpu"


@pytest.mark.parametrize("opt_level", ["disable", "basic", "extended", "all"])
def test_opt_levels(opt_level):
    assert bench([conv_model()], opt_level=opt_level, **FAST).timings[0].ratio == 1.0


def test_plot_writes_png(model_paths, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    plot(bench(model_paths, **FAST), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(model_paths, tmp_path, monkeypatch):
    import sys
    result = bench(model_paths, **FAST)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(UsageError, match="matplotlib"):
        plot(result, str(tmp_path / "x.png"))


def test_input_values_are_fed():
    from tests.util import sample_rate_model

    model = sample_rate_model()
    with pytest.raises(UsageError, match="cannot run"):
        bench([model], **FAST)
    result = bench([model], input_values={"sr": 16000}, **FAST)
    assert result.input_shapes["sr"] == [] and "sr:scalar" in result.format_table()
