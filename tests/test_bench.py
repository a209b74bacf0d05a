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
    assert set(data) == {"timings", "provider", "threads", "batch", "rounds", "input_shapes"}
    assert set(data["timings"][0]) == {"path", "median_ms", "p10_ms", "p90_ms", "samples_ms", "ratio"}
    assert json.loads(json.dumps(data)) == data


def test_format_table(model_paths):
    table = bench(model_paths, **FAST).format_table()
    lines = table.splitlines()
    assert len(lines) == 2 + len(model_paths)
    assert "median ms" in lines[1] and "ratio" in lines[1]
    assert "x:1x3x8x8" in lines[0]
    for path, line in zip(model_paths, lines[2:]):
        assert line.startswith(path)
    assert lines[2].rstrip().endswith("1.000")


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
