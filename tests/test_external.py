"""Models whose weights stay on disk: lazy load, memory-mapped reads, spilled new weights, streamed save."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import graphfold
from graphfold import external, graph
from graphfold.errors import UsageError
from graphfold.io import load_model, save_model
from tests.util import assert_same_outputs

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "models", "resnet_bn.onnx")


@pytest.fixture
def on_disk(tmp_path):
    """The sample ResNet saved with every tensor over 256 bytes in an external data file."""
    path = tmp_path / "in" / "net.onnx"
    path.parent.mkdir()
    onnx.save_model(onnx.load(SAMPLE), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="net.onnx.data", size_threshold=256)
    return path


def fingerprint(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_lazy_fold_streams_weights_into_the_output_data_file(on_disk, tmp_path, monkeypatch):
    # Spill even small new weights, so the scratch-file path is exercised too.
    monkeypatch.setattr(graph, "SPILL_BYTES", 256)
    before = fingerprint(on_disk.parent)
    model = load_model(str(on_disk), lazy=True)
    assert external.has_external_refs(model)
    folded, report = graphfold.fold(model, check=False)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    out = tmp_path / "out.onnx"
    save_model(folded, str(out))
    assert sorted(os.listdir(tmp_path)) == ["in", "out.onnx", "out.onnx.data"]
    assert fingerprint(on_disk.parent) == before  # the input is untouched
    saved = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in external.all_tensors(saved.graph) for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}  # self-contained: no reference to the input or a scratch file
    assert_same_outputs(onnx.load(SAMPLE), onnx.load(str(out)), rtol=1e-5)


def test_lazy_reads_are_memory_maps_and_not_cached(on_disk):
    model = load_model(str(on_disk), lazy=True)
    import onnx_graphsurgeon as gs

    weights = [t for t in gs.import_onnx(model).tensors().values()
               if isinstance(t, gs.Constant) and external.is_external(t._values.tensor)]
    value = graph.const_value(weights[0])
    assert isinstance(value, np.memmap) and not value.flags.writeable
    assert external.is_external(weights[0]._values.tensor)  # the proto still holds no bytes


def test_cli_folds_a_model_with_external_data(on_disk, tmp_path, monkeypatch):
    monkeypatch.setattr("graphfold.io.LAZY_EXTERNAL_BYTES", 0)  # take the on-disk route
    from graphfold.cli import main

    assert main([str(on_disk), "-o", str(tmp_path / "out.onnx"), "-q"]) == 0
    assert_same_outputs(onnx.load(SAMPLE), onnx.load(str(tmp_path / "out.onnx")), rtol=1e-5)


def test_small_external_data_is_loaded_into_the_proto(on_disk):
    model = load_model(str(on_disk))
    assert not external.has_external_refs(model)


@pytest.mark.parametrize("location, reason", [("../elsewhere.data", "leaves the model's folder"),
                                              ("missing.data", "is missing")])
def test_bad_external_references_are_one_usage_error(on_disk, location, reason):
    model = onnx.load(str(on_disk), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if external.is_external(t))
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(on_disk))
    with pytest.raises(UsageError, match=reason):
        load_model(str(on_disk), check=False)
