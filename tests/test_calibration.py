"""graphfold.calibration: loading, checking and batching calibration data; one test per refusal."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphfold.calibration import DEFAULT_BATCH, load_calibration, top1_accuracy
from graphfold.errors import UsageError
from graphfold.inputs import fit_input_values
from tests.util import make_model, sample_rate_model


def two_input_model(batch="N", x_shape=(3, 4, 4)):
    """y = x + z; both inputs [batch, *x_shape]."""
    shape = [batch, *x_shape]
    return make_model([helper.make_node("Add", ["x", "z"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def one_input_model(batch="N", shape=(3, 4, 4)):
    return make_model([helper.make_node("Relu", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, *shape])])


def arrays(samples=10, shape=(3, 4, 4), dtype=np.float32, names=("x", "z")):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((samples, *shape)).astype(dtype) for n in names}


def test_npz_loads_and_streams_fixed_size_batches(tmp_path):
    path = tmp_path / "cal.npz"
    data = arrays(10)
    np.savez(path, **data)
    cal = load_calibration(str(path), two_input_model(), batch_size=4)
    assert cal.source == str(path) and not cal.is_random and cal.samples == 10
    sizes = [b["x"].shape[0] for b in cal.batches()]
    assert sizes == [4, 4, 2]
    assert [b["z"].shape[0] for b in cal.batches(5)] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cal.batches()]), data["x"])
    assert cal.info()["inputs"] == {"x": [10, 3, 4, 4], "z": [10, 3, 4, 4]}


def test_default_batch_size_for_a_dynamic_batch_dim():
    cal = load_calibration(arrays(40), two_input_model())
    assert cal.batch_size == DEFAULT_BATCH


def test_missing_input_names_the_input_and_the_arrays_there_are():
    with pytest.raises(UsageError, match=r"no array for graph input 'z' \(arrays: inputs, x"):
        load_calibration({"x": arrays()["x"], "inputs": arrays()["z"]}, two_input_model())


def test_extra_arrays_are_ignored_with_a_note():
    data = arrays()
    data["other"] = data["x"]
    assert any("other" in note for note in load_calibration(data, two_input_model()).notes)


def test_wrong_rank_is_refused():
    with pytest.raises(UsageError, match=r"rank 3.*input has rank 4"):
        load_calibration(arrays(shape=(3, 4)), two_input_model())


def test_wrong_fixed_dim_is_refused():
    with pytest.raises(UsageError, match=r"dim 2 is 4: expected \[samples, 3, 4, 4\]"):
        load_calibration(arrays(shape=(3, 5, 4)), two_input_model())


def test_given_input_shape_dims_must_match_too():
    model = one_input_model(shape=(3, "H", "W"))
    load_calibration({"x": arrays(shape=(3, 6, 6), names="x")["x"]}, model)  # symbolic: anything goes
    with pytest.raises(UsageError, match="dim 2 is 8"):
        load_calibration({"x": arrays(shape=(3, 6, 6), names="x")["x"]}, model, input_shapes={"x": [1, 3, 8, 8]})


def test_float64_is_converted_with_a_note_and_ints_are_refused():
    cal = load_calibration(arrays(dtype=np.float64), two_input_model())
    assert cal.arrays["x"].dtype == np.float32 and any("float64" in n for n in cal.notes)
    data = arrays()
    data["x"] = data["x"].astype(np.int64)
    with pytest.raises(UsageError, match="int64, the input takes float32"):
        load_calibration(data, two_input_model())


def test_inputs_with_different_sample_counts_are_refused():
    data = arrays()
    data["z"] = data["z"][:7]
    with pytest.raises(UsageError, match="different sample counts"):
        load_calibration(data, two_input_model())


def test_empty_and_scalar_arrays_are_refused():
    with pytest.raises(UsageError, match="holds no samples"):
        load_calibration(arrays(samples=0), two_input_model())
    with pytest.raises(UsageError, match="is a scalar"):
        load_calibration({"x": np.float32(1.0), "z": np.float32(1.0)}, two_input_model())


def test_fixed_batch_dim_sets_the_batch_and_drops_a_partial_one():
    cal = load_calibration(arrays(10), two_input_model(batch=4))
    assert cal.batch_size == 4 and cal.samples == 8
    assert any("dropped the last 2 samples" in n for n in cal.notes)
    with pytest.raises(UsageError, match="3 samples, but the model's batch dim is fixed at 4"):
        load_calibration(arrays(3), two_input_model(batch=4))


def test_labels_from_the_npz_key_or_a_file(tmp_path):
    data = arrays(6)
    np.savez(tmp_path / "cal.npz", labels=np.arange(6), **data)
    cal = load_calibration(str(tmp_path / "cal.npz"), two_input_model())
    np.testing.assert_array_equal(cal.labels, np.arange(6))
    np.save(tmp_path / "labels.npy", np.arange(6)[::-1].astype(np.float32))
    cal = load_calibration(data, two_input_model(), labels=str(tmp_path / "labels.npy"))
    np.testing.assert_array_equal(cal.labels, np.arange(6)[::-1])
    assert [len(b) for b in load_calibration(data, two_input_model(), labels=np.arange(6),
                                             batch_size=4).label_batches()] == [4, 2]


def test_one_hot_labels_become_classes():
    one_hot = np.eye(3)[[2, 0, 1, 1, 0, 2]]
    cal = load_calibration(arrays(6), two_input_model(), labels=one_hot)
    np.testing.assert_array_equal(cal.labels, [2, 0, 1, 1, 0, 2])


@pytest.mark.parametrize("labels, message", [
    (np.arange(5), "5 labels for 6 samples"),
    (np.full(6, 0.5), "integer classes"),
    (np.zeros((6, 1, 2)), "one class per sample"),
    (np.array(["a"] * 6), "integer classes"),
])
def test_bad_labels_are_refused(labels, message):
    with pytest.raises(UsageError, match=message):
        load_calibration(arrays(6), two_input_model(), labels=labels)


def test_labels_need_calibration_data():
    with pytest.raises(UsageError, match="--labels needs --calibration"):
        load_calibration(None, two_input_model(), labels=np.arange(3))


def test_plain_npy_serves_a_single_input_model_only(tmp_path):
    np.save(tmp_path / "x.npy", arrays(names="x")["x"])
    assert load_calibration(str(tmp_path / "x.npy"), one_input_model()).samples == 10
    with pytest.raises(UsageError, match="single-input model only"):
        load_calibration(str(tmp_path / "x.npy"), two_input_model())


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UsageError, match="calibration file not found"):
        load_calibration(str(tmp_path / "none.npz"), two_input_model())
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(UsageError, match="not a .npz/.npy file"):
        load_calibration(str(tmp_path / "bad.npz"), two_input_model())
    with pytest.raises(UsageError, match="labels file not found"):
        load_calibration(arrays(), two_input_model(), labels=str(tmp_path / "none.npy"))


def test_random_calibration_is_seeded_and_says_it_is_weaker():
    a = load_calibration(None, two_input_model(x_shape=(3, "H", "W")), input_shapes={"x": [1, 3, 5, 5],
                                                                                     "z": [1, 3, 5, 5]})
    b = load_calibration(None, two_input_model(x_shape=(3, "H", "W")), input_shapes={"x": [1, 3, 5, 5],
                                                                                     "z": [1, 3, 5, 5]})
    assert a.is_random and a.samples == 32 and a.arrays["x"].shape == (32, 3, 5, 5)
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert "weaker" in a.notes[0] and a.info()["random"]


def test_top1_accuracy():
    scores = [np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0.3, 0.7]])]
    labels = [np.array([1, 1]), np.array([1])]
    assert top1_accuracy(scores, labels) == pytest.approx(2 / 3)
    assert top1_accuracy([np.zeros(3)], [np.zeros(3, int)]) is None  # no classes axis


# --- inputs the data cannot hold: --input-value (issue 10) ------------------------------------

def test_a_scalar_input_the_data_lacks_takes_its_input_value(tmp_path):
    model = sample_rate_model()
    np.savez(tmp_path / "cal.npz", x=arrays(6, (4, 8, 8), names=("x",))["x"])
    with pytest.raises(UsageError, match="--input-value sr:VALUE"):
        load_calibration(str(tmp_path / "cal.npz"), model)
    cal = load_calibration(str(tmp_path / "cal.npz"), model, batch_size=4,
                           input_values=fit_input_values(model, {"sr": 16000}))
    batches = list(cal.batches())
    assert [b["x"].shape[0] for b in batches] == [4, 2]
    assert all(b["sr"].shape == () and b["sr"] == 16000 for b in batches)
    assert cal.info()["input_values"] == {"sr": []}


def test_a_scalar_given_for_a_tensor_input_fills_one_sample_array():
    cal = load_calibration({"x": arrays(5)["x"]}, two_input_model(), batch_size=2,
                           input_values={"z": np.array(0.5, np.float32)})
    assert cal.arrays["z"].shape == (5, 3, 4, 4) and np.all(cal.arrays["z"] == 0.5)
    assert [b["z"].shape[0] for b in cal.batches()] == [2, 2, 1]


def test_random_calibration_feeds_input_values():
    model = sample_rate_model()
    cal = load_calibration(None, model, input_values=fit_input_values(model, {"sr": 16000}))
    assert cal.is_random and "sr" not in cal.arrays
    assert all(b["sr"] == 16000 for b in cal.batches())
