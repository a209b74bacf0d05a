"""Weights read in place and streamed out (graphfold.mapped): the file written is onnx's own,
byte for byte; what the scan does not understand goes to onnx.load; ``fold_file`` validates the
file as written and writes nothing when that fails."""
from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfold
from graphfold import api, io, mapped
from graphfold.errors import UsageError, ValidationError
from tests.util import assert_same_outputs, random_feeds, run_ort

RNG = np.random.default_rng(0)


def conv_bn_model(channels: int = 72, blocks: int = 2, extras: bool = True) -> onnx.ModelProto:
    """conv3x3 + BN (+ a parallel 1x1 + BN) blocks with weights large enough to be detached."""
    nodes, inits = [], []
    x = "x"
    for b in range(blocks):
        for kind, k in (("a", 3), ("b", 1)):
            w = RNG.standard_normal((channels, channels, k, k)).astype(np.float32) * 0.1
            inits.append(numpy_helper.from_array(w, f"w{b}{kind}"))
            nodes.append(helper.make_node("Conv", [x, f"w{b}{kind}"], [f"c{b}{kind}"], pads=[k // 2] * 4))
            bn = [RNG.uniform(0.5, 1.5, channels), RNG.standard_normal(channels), RNG.standard_normal(channels),
                  RNG.uniform(0.5, 2, channels)]
            names = [f"{p}{b}{kind}" for p in ("g", "be", "m", "v")]
            inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(bn, names)]
            nodes.append(helper.make_node("BatchNormalization", [f"c{b}{kind}", *names], [f"n{b}{kind}"]))
        nodes.append(helper.make_node("Add", [f"n{b}a", f"n{b}b"], [f"s{b}"]))
        nodes.append(helper.make_node("Relu", [f"s{b}"], [f"r{b}"]))
        x = f"r{b}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    if extras:
        # Fields around the graph and the initializers, each of which must come back in place.
        model.doc_string = "doc"
        model.model_version = 3
        helper.set_model_props(model, {"author": "me"})
        model.graph.doc_string = "graph doc"
        model.graph.value_info.append(helper.make_tensor_value_info("s0", TensorProto.FLOAT, [1, channels, 8, 8]))
        model.graph.initializer.append(numpy_helper.from_array(np.arange(5000, dtype=np.int64), "unused_int64"))
        model.graph.initializer.append(numpy_helper.from_array(np.ones(5000, np.float16), "unused_half"))
        floats = helper.make_tensor("unused_float_data", TensorProto.FLOAT, [4097], np.ones(4097).tolist())
        model.graph.initializer.append(floats)  # float_data, not raw_data: stays in the message
        model.graph.initializer.append(numpy_helper.from_array(np.ones(4096, np.float32), "small"))
    return model


def save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


def test_read_then_write_is_onnx_save_byte_for_byte(tmp_path):
    model = conv_bn_model()
    path = save(model, tmp_path / "m.onnx")
    detached = mapped.read(path)
    # The 4 conv weights and the two big unused raw tensors; not the float_data one, not the small one.
    assert sorted(detached.arrays) == ["unused_half", "unused_int64", "w0a", "w0b", "w1a", "w1b"]
    for init in detached.proto.graph.initializer:
        assert init.HasField("raw_data") == (init.name not in {*detached.arrays, "unused_float_data"})
    np.testing.assert_array_equal(detached.arrays["unused_int64"], np.arange(5000))
    assert not detached.arrays["w0a"].flags.writeable  # a read-only map of the file
    with open(tmp_path / "out.onnx", "wb") as handle:
        written = detached.write(handle)
    expected = model.SerializeToString()
    assert (tmp_path / "out.onnx").read_bytes() == expected and written == len(expected)
    assert detached.materialize().SerializeToString() == expected


def test_fields_in_any_order_and_duplicate_names(tmp_path):
    # A writer may put raw_data before dims; a second initializer of the same name stays inline.
    model = conv_bn_model(extras=False)
    weight = model.graph.initializer[0]
    reordered = (b"\x4a" + mapped.encode_varint(len(weight.raw_data)) + weight.raw_data  # field 9, raw_data
                 + b"\x42" + mapped.encode_varint(len(weight.name)) + weight.name.encode()  # field 8, name
                 + b"\x10\x01"  # field 2, data_type FLOAT
                 + b"".join(b"\x08" + mapped.encode_varint(d) for d in weight.dims))  # field 1, dims
    parsed = TensorProto()
    parsed.ParseFromString(reordered)
    assert numpy_helper.to_array(parsed).shape == tuple(weight.dims)
    model.graph.initializer.append(next(t for t in model.graph.initializer if t.name == "w0b"))  # twice
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_entry_replaced(model, 0, reordered))
    detached = mapped.read(str(path))
    np.testing.assert_array_equal(detached.arrays["w0a"], numpy_helper.to_array(weight))
    duplicates = [init for init in detached.proto.graph.initializer if init.name == "w0b"]
    assert len(duplicates) == 2 and not duplicates[0].HasField("raw_data") and duplicates[1].HasField("raw_data")
    reference = onnx.load(str(path))
    assert detached.materialize().SerializeToString() == reference.SerializeToString()


def test_a_raw_data_field_of_another_wire_type_is_left_to_protobuf(tmp_path, monkeypatch):
    # Field 9 written as a varint is no raw data: not detached, parsed as protobuf parses it.
    monkeypatch.setattr(mapped, "DETACH_ELEMENTS", 0)  # so that one byte would be detached
    model = conv_bn_model(extras=False)
    weight = model.graph.initializer[0]
    odd = TensorProto()
    odd.CopyFrom(weight)
    odd.ClearField("raw_data")
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_entry_replaced(model, 0, odd.SerializeToString() + b"\x48\x05"))  # field 9, varint 5
    detached = mapped.read(str(path))
    assert "w0a" not in detached.arrays and "w1a" in detached.arrays
    assert detached.materialize().SerializeToString() == onnx.load(str(path)).SerializeToString()


def _with_entry_replaced(model: onnx.ModelProto, index: int, tensor_bytes: bytes) -> bytes:
    """The model's encoding with initializer ``index`` encoded as ``tensor_bytes``."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    entries = b""
    for i, init in enumerate(model.graph.initializer):
        body = tensor_bytes if i == index else init.SerializeToString()
        entries += b"\x2a" + mapped.encode_varint(len(body)) + body  # GraphProto field 5
    graph_bytes = graph.SerializeToString() + entries
    return rest.SerializeToString() + b"\x3a" + mapped.encode_varint(len(graph_bytes)) + graph_bytes  # field 7


def test_what_the_scan_leaves_to_onnx(tmp_path):
    # No weight large enough: nothing to detach.
    assert mapped.read(save(conv_bn_model(channels=4, extras=False), tmp_path / "small.onnx")) is None
    model = conv_bn_model(extras=False)
    encoded = model.SerializeToString()
    # The graph split over two fields (protobuf merges them): onnx.load's business.
    graph = model.graph.SerializeToString()
    half = len(model.graph.node)
    first = onnx.GraphProto()
    first.node.extend(model.graph.node[:half])
    second = onnx.GraphProto()
    second.CopyFrom(model.graph)
    del second.node[:half]
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    split = rest.SerializeToString() + b"".join(b"\x3a" + mapped.encode_varint(len(g)) + g
                                               for g in (first.SerializeToString(), second.SerializeToString()))
    assert len(graph) > 0 and onnx.load_from_string(split).graph.node[0].op_type == "Conv"
    (tmp_path / "split.onnx").write_bytes(split)
    assert mapped.read(str(tmp_path / "split.onnx")) is None
    loaded, _ = io.load_model_sized(str(tmp_path / "split.onnx"), detach=True)
    assert isinstance(loaded, onnx.ModelProto) and len(loaded.graph.node) == len(model.graph.node)
    # Truncated: the ordinary loader's message.
    (tmp_path / "cut.onnx").write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(UsageError, match="not an ONNX model or truncated"):
        io.load_model_sized(str(tmp_path / "cut.onnx"), detach=True)


def test_a_tensor_whose_bytes_do_not_match_its_dims(tmp_path):
    model = conv_bn_model(extras=False)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = save(model, tmp_path / "bad.onnx")
    with pytest.raises(UsageError, match=r"invalid ONNX graph: tensor 'w0a' holds 186620 bytes, but its dims "
                                         r"\[72, 72, 3, 3\] need 186624"):
        io.load_model_sized(path, detach=True)
    with pytest.raises(UsageError, match="tensor 'w0a' holds 186620 bytes"):
        io.load_model_sized(path)  # the ordinary route says the same


def test_fold_file_writes_what_fold_returns(tmp_path):
    model = conv_bn_model()
    path = save(model, tmp_path / "m.onnx")
    report = graphfold.fold_file(path, tmp_path / "out.onnx")
    folded, expected = graphfold.fold(path)
    assert report.validation.passed and len(report.rewrites) == len(expected.rewrites) >= 6
    assert (tmp_path / "out.onnx").read_bytes() == folded.SerializeToString()
    assert report.after["file_bytes"] == os.path.getsize(tmp_path / "out.onnx")
    assert_same_outputs(model, onnx.load(str(tmp_path / "out.onnx")))
    # The same from the model in memory (no mapping): the same result.
    assert graphfold.fold(model)[0].SerializeToString() == folded.SerializeToString()


def test_fold_file_validates_the_file_it_wrote(tmp_path, monkeypatch):
    path = save(conv_bn_model(), tmp_path / "m.onnx")
    seen = []
    real = api.compare_models

    def spy(reference, candidate, **kwargs):
        seen.append(kwargs["candidate_path"])
        # The staged file is complete (weights and all), and not yet in place.
        assert os.path.getsize(kwargs["candidate_path"]) > 4 * 72 * 72 * 9 and not (tmp_path / "out.onnx").exists()
        return real(reference, candidate, **kwargs)

    monkeypatch.setattr(api, "compare_models", spy)
    graphfold.fold_file(path, tmp_path / "out.onnx")
    assert len(seen) == 1 and os.path.basename(seen[0]) == "out.onnx" and not os.path.exists(seen[0])

    # A result that does not validate is not written, and no staging file stays behind.
    from graphfold.kernels import ConvParams
    from graphfold.passes import affine

    def wrong(p, scale, shift):
        return ConvParams.create(p.weight * 1.5, p.bias)

    monkeypatch.setattr(api, "compare_models", real)
    monkeypatch.setattr(affine.kernels, "affine_after_conv", wrong)
    with pytest.raises(ValidationError):
        graphfold.fold_file(path, tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_fold_file_over_the_protobuf_limit_writes_a_data_file(tmp_path, monkeypatch):
    model = conv_bn_model()
    path = save(model, tmp_path / "m.onnx")
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)  # "2 GB", scaled down
    report = graphfold.fold_file(path, tmp_path / "out.onnx")
    assert report.validation.passed  # run by onnxruntime from the staged file and its data file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx", "out.onnx.data"]
    folded = onnx.load(str(tmp_path / "out.onnx"))  # loads the data file
    assert_same_outputs(model, folded)
    raw = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    external = [t for t in raw.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) == 2  # the two merged conv weights
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in external)


def test_overridable_initializers_keep_their_values(tmp_path):
    # An initializer that is also a graph input (IR >= 4) is not folded; its default stays.
    model = conv_bn_model(extras=False)
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, list(weight.dims)))
    path = save(model, tmp_path / "m.onnx")
    graphfold.fold_file(path, tmp_path / "out.onnx")
    folded = onnx.load(str(tmp_path / "out.onnx"))
    kept = {t.name: t for t in folded.graph.initializer}[weight.name]
    assert kept.raw_data == weight.raw_data
    feeds = random_feeds(model)
    np.testing.assert_allclose(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], rtol=1e-4, atol=1e-5)
    # In memory the same (graphsurgeon's export crashed on such an input, file or not).
    assert graphfold.fold(model)[0].SerializeToString() == folded.SerializeToString()


def test_no_weight_stays_in_memory_while_onnxruntime_validates(tmp_path, monkeypatch):
    # Written to the staged file, the weights (computed, or maps of the input) are all let go
    # before onnxruntime loads both models: none of them may be alive when validation starts.
    path = save(conv_bn_model(), tmp_path / "m.onnx")
    monkeypatch.setattr(api, "COLLECT_ELEMENTS", 0)  # the test model is small
    held = []
    real_save, real_compare = api.save_model, api.compare_models

    def save_spy(model, output, verify=None):
        held.extend(weakref.ref(a) for a in model.arrays.values())
        return real_save(model, output, verify=verify)

    def compare_spy(*args, **kwargs):
        assert held and not [ref for ref in held if ref() is not None]
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(api, "save_model", save_spy)
    monkeypatch.setattr(api, "compare_models", compare_spy)
    assert graphfold.fold_file(path, tmp_path / "out.onnx").validation.passed


def test_weights_a_rewrite_replaced_are_released_at_once(tmp_path):
    # graphsurgeon's tensors are reference cycles: a replaced weight is let go by the pass,
    # not left to the cyclic collector; one that another node still reads is kept.
    import onnx_graphsurgeon as gs

    from graphfold.engine import FoldContext, run_pass
    from graphfold.graph import const_value
    from graphfold.passes.affine import FoldBatchNorm

    model = conv_bn_model(extras=False)
    model.graph.node.append(helper.make_node("Conv", ["x", "w0b"], ["extra"]))  # w0b read twice
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    w0a, w0b, gamma = tensors["w0a"], tensors["w0b"], tensors["g0a"]
    gc.disable()  # nothing but the pass may free them
    try:
        rewrites = run_pass(FoldContext(graph), FoldBatchNorm())
    finally:
        gc.enable()
    assert len(rewrites) == 3  # w0b's BN declined: the weight is shared
    assert w0a._values is None and gamma._values is None and w0b._values is not None
    with pytest.raises(RuntimeError, match="released"):
        const_value(w0a)


def test_every_bundled_model_round_trips_with_every_tensor_detached(monkeypatch):
    # onnx's own test models (and ours), with the threshold at 0 so that every raw tensor of the
    # main graph is detached: reading and writing back gives onnx's serialization, byte for byte.
    import glob
    import io as pyio

    monkeypatch.setattr(mapped, "DETACH_ELEMENTS", 0)
    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    paths = sorted(glob.glob(os.path.join(data, "**", "*.onnx"), recursive=True) + glob.glob(f"{models}/*.onnx"))
    detached = 0
    for path in paths:
        model = mapped.read(path)
        if model is None:
            continue
        detached += 1
        expected = onnx.load(path, load_external_data=False).SerializeToString()
        buffer = pyio.BytesIO()
        model.write(buffer)
        assert buffer.getvalue() == expected, path
        assert model.materialize().SerializeToString() == expected, path
    assert detached >= 50  # of about 150: the rest have no initializer with raw data
