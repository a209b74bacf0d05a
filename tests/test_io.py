"""graphfold.io: every unreadable model is one UsageError line; saving is atomic."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfold import io as model_io
from graphfold.errors import UsageError
from graphfold.io import check_model, ensure_writable, load_model, save_model
from tests.util import make_model

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "models", "resnet_bn.onnx")


def conv_model(channels: int = 4) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(channels * 27, dtype=np.float32).reshape(channels, 3, 3, 3), "w")
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], [weight])


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def assert_usage_error(path: str, *fragments: str) -> str:
    with pytest.raises(UsageError) as info:
        load_model(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(path)
    for fragment in fragments:
        assert fragment in text
    return text


# --- loading ----------------------------------------------------------------------------------

def test_load_a_good_model(tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(conv_model(), path)
    assert load_model(path) == conv_model()


def test_load_missing_file(tmp_path):
    assert_usage_error(str(tmp_path / "absent.onnx"), "no such file")


def test_load_a_directory(tmp_path):
    assert_usage_error(str(tmp_path), "is a directory")


def test_load_an_empty_file(tmp_path):
    assert_usage_error(write(tmp_path / "empty.onnx", b""), "empty file")


@pytest.mark.parametrize("data", [b"hello, this is not a model\n", bytes(range(256)) * 4, b"\x08\x07", b"{}"],
                         ids=["text", "binary", "no-graph", "json"])
def test_load_not_onnx(tmp_path, data):
    assert_usage_error(write(tmp_path / "bad.onnx", data), "not an ONNX model")


def test_load_truncated_at_any_point(tmp_path):
    # Wherever a download stops, the result is one readable error, never a crash or a half model.
    data = open(SAMPLE, "rb").read()
    path = tmp_path / "cut.onnx"
    for cut in range(1, len(data), max(1, len(data) // 97)):
        path.write_bytes(data[:cut])
        with pytest.raises(UsageError):
            load_model(str(path))


def test_load_fails_the_checker(tmp_path):
    model = conv_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = str(tmp_path / "broken.onnx")
    onnx.save(model, path)
    assert_usage_error(path, "invalid ONNX graph")


def test_load_unknown_opset(tmp_path):
    model = conv_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = str(tmp_path / "future.onnx")
    onnx.save(model, path)
    assert_usage_error(path, f"opset {onnx.defs.onnx_opset_version() + 5}", "upgrade onnx")


def test_load_unknown_ir_version(tmp_path):
    model = conv_model()
    model.ir_version = onnx.IR_VERSION + 5
    path = str(tmp_path / "future_ir.onnx")
    onnx.save(model, path)
    assert_usage_error(path, "IR version")


def test_load_missing_external_data(tmp_path):
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(conv_model(), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    os.remove(tmp_path / "ext.onnx.data")
    assert_usage_error(path)


def test_check_model_without_reading_a_file():
    model = conv_model()
    check_model(model)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UsageError, match="invalid ONNX graph"):
        check_model(model, "in memory")


# --- writability, before any work -------------------------------------------------------------

def test_ensure_writable_accepts_a_new_file(tmp_path):
    ensure_writable(str(tmp_path / "out.onnx"), SAMPLE)
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind


def test_ensure_writable_refuses_the_input(tmp_path):
    source = tmp_path / "in.onnx"
    source.write_bytes(b"model")
    os.symlink(source, tmp_path / "link.onnx")
    for spelling in (str(source), str(tmp_path / "sub" / os.pardir / "in.onnx"), str(tmp_path / "link.onnx")):
        with pytest.raises(UsageError, match="would overwrite the input"):
            ensure_writable(spelling, str(source))


@pytest.mark.parametrize("where", ["missing-folder", "parent-is-a-file", "is-a-directory"])
def test_ensure_writable_refuses_unwritable_paths(tmp_path, where):
    (tmp_path / "file.txt").write_text("x")
    path = {"missing-folder": tmp_path / "nope" / "out.onnx",
            "parent-is-a-file": tmp_path / "file.txt" / "out.onnx",
            "is-a-directory": tmp_path}[where]
    with pytest.raises(UsageError) as info:
        ensure_writable(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_ensure_writable_refuses_a_folder_that_refuses_files():
    # Permission bits say yes to root; /proc refuses new files to everyone.
    with pytest.raises(UsageError, match="cannot write"):
        ensure_writable("/proc/graphfold-out.onnx")


# --- saving -----------------------------------------------------------------------------------

def test_save_round_trip_leaves_no_temporary_files(tmp_path):
    path = str(tmp_path / "out.onnx")
    save_model(conv_model(), path)
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert load_model(path) == conv_model()


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    save_model(conv_model(), str(path))
    assert load_model(str(path)) == conv_model()


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old contents")

    def half_write(model, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", half_write)
    with pytest.raises(UsageError, match="No space left on device"):
        save_model(conv_model(), str(path))
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["out.onnx"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_save_into_a_folder_that_refuses_files():
    with pytest.raises(UsageError, match="cannot write output"):
        save_model(conv_model(), "/proc/graphfold-out.onnx")


def test_save_large_model_with_external_data(tmp_path, monkeypatch):
    # The 2 GB path, exercised on a small model by lowering the threshold.
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 64)
    path = str(tmp_path / "big.onnx")
    model = conv_model(channels=64)
    save_model(model, path)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    loaded = load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    # The caller's model keeps its weights in memory.
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT


def _weighted_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])


def test_file_bytes_of_an_inline_model_is_its_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_weighted_model(), path)
    assert model_io.load_model_sized(str(path))[1] == os.path.getsize(path)


def test_file_bytes_counts_the_external_data_files(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_weighted_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert model_io.load_model_sized(str(path))[1] == os.path.getsize(path) + os.path.getsize(tmp_path / "m.data")


def test_save_model_returns_the_bytes_it_wrote(tmp_path):
    path = tmp_path / "out.onnx"
    assert save_model(_weighted_model(), str(path)) == os.path.getsize(path)
