"""--refit: the ridge fit against a direct solve, exactly linear regions, the holdout, refusals, end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfold
from graphfold.calibration import load_calibration
from graphfold.cli import main
from graphfold.refit import RefitOptions
from graphfold.refit.fit import ConvFit, im2col, rows_of
from graphfold.refit.regions import cuts, regions
from graphfold.refit.stage import LINEARIZE, Candidate, RefitStage
from tests.util import run_ort


def direct_lstsq(x, y, kernel, strides, pads):
    patches = im2col(x, kernel, strides, pads)
    design = np.concatenate([patches, np.ones((patches.shape[0], 1))], axis=1)
    return np.linalg.lstsq(design, rows_of(y), rcond=None)[0]


@pytest.mark.parametrize("strides,pads", [((1, 1), (1, 1, 1, 1)), ((2, 2), (1, 1, 1, 1)), ((1, 1), (0, 1, 2, 0))])
def test_fit_matches_direct_least_squares(strides, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 7, 7))
    out_h = (7 + pads[0] + pads[2] - 3) // strides[0] + 1
    out_w = (7 + pads[1] + pads[3] - 3) // strides[1] + 1
    y = rng.normal(size=(6, 4, out_h, out_w))
    fit = ConvFit(3, 4, (3, 3), strides, pads, ridge=0.0)
    for start in range(0, 6, 4):  # two batches of unequal size: the sums must not care
        fit.add(x[start:start + 4], y[start:start + 4])
    result = fit.solve()
    expected = direct_lstsq(x, y, (3, 3), strides, pads)
    np.testing.assert_allclose(result.weight.reshape(4, -1), expected[:-1].T, atol=1e-10)
    np.testing.assert_allclose(result.bias, expected[-1], atol=1e-10)
    assert 0 < result.residual < 1


def test_grouped_fit_is_one_regression_per_group():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 4, 6, 6)), rng.normal(size=(5, 4, 6, 6))
    result = ConvFit(4, 4, (3, 3), (1, 1), (1, 1, 1, 1), group=4, ridge=0.0)
    result.add(x, y)
    solved = result.solve()
    patches = im2col(x, (3, 3), (1, 1), (1, 1, 1, 1)).reshape(-1, 4, 9)
    for c in range(4):
        design = np.concatenate([patches[:, c], np.ones((patches.shape[0], 1))], axis=1)
        expected = np.linalg.lstsq(design, rows_of(y)[:, c], rcond=None)[0]
        np.testing.assert_allclose(solved.weight[c, 0].ravel(), expected[:-1], atol=1e-10)
        np.testing.assert_allclose(solved.bias[c], expected[-1], atol=1e-10)


def test_ridge_shrinks_weights_but_not_the_bias():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 2, 5, 5))
    y = rng.normal(size=(4, 3, 5, 5)) + 7.0
    plain, ridged = (ConvFit(2, 3, (3, 3), (1, 1), (1, 1, 1, 1), ridge=r) for r in (0.0, 10.0))
    plain.add(x, y)
    ridged.add(x, y)
    a, b = plain.solve(), ridged.solve()
    assert np.linalg.norm(b.weight) < 0.5 * np.linalg.norm(a.weight)
    np.testing.assert_allclose(b.bias, y.mean(axis=(0, 2, 3)), atol=0.3)  # the mean stays reachable


def test_a_conv_target_is_recovered_exactly():
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(5, 3, 3, 3)), rng.normal(size=5)
    x = rng.normal(size=(8, 3, 6, 6))
    y = (im2col(x, (3, 3), (2, 2), (1, 1, 1, 1)) @ weight.reshape(5, -1).T + bias).reshape(8, 3, 3, 5)
    fit = ConvFit(3, 5, (3, 3), (2, 2), (1, 1, 1, 1), max_rows=60)  # row sampling too
    fit.add(x, y.transpose(0, 3, 1, 2))
    result = fit.solve()
    np.testing.assert_allclose(result.weight, weight, atol=1e-4)
    assert result.residual < 1e-4


# --- models -------------------------------------------------------------------------------------

def _init(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def linear_in_disguise(seed=0, classes=3):
    """x -> 1x1 conv (positive, no bias) -> Relu -> 3x3 conv -> pool -> classifier.

    On non-negative inputs the Relu never clips, so the region conv-Relu-conv is exactly one 3x3 conv.
    """
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.uniform(0.1, 1.0, (8, 4, 1, 1))), _init("w2", rng.normal(size=(4, 8, 3, 3))),
             _init("b2", rng.normal(size=4)), _init("fc", rng.normal(size=(classes, 4))),
             _init("fb", np.zeros(classes))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_cuts_and_regions_are_structural():
    model = linear_in_disguise()
    assert [c.tensor for c in cuts(model.graph)] == ["x", "h", "r", "c", "p", "f", "y"]
    found = [(r.source, r.target) for r in regions(model.graph)]
    assert ("x", "c") in found  # the conv-act-conv pair
    assert all(t not in ("p", "f", "y") for _, t in found)  # pooling and the classifier are no region


def test_exactly_linear_region_refits_to_zero_error():
    model = linear_in_disguise()
    x = np.random.default_rng(5).uniform(0, 1, (160, 4, 6, 6)).astype(np.float32)
    folded, report = graphfold.fold(model, calibration={"x": x}, refit=RefitOptions(min_agreement=1.0))
    accepted = [r for r in report.rewrites if r.pass_name == LINEARIZE]
    assert len(accepted) == 1
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 1
    assert not any(n.op_type == "Relu" for n in folded.graph.node)
    fresh = np.random.default_rng(6).uniform(0, 1, (20, 4, 6, 6)).astype(np.float32)
    expected, got = run_ort(model, {"x": fresh})[0], run_ort(folded, {"x": fresh})[0]
    assert np.max(np.abs(got - expected)) <= 1e-3 * np.max(np.abs(expected))
    candidate = next(c for c in report.refit["candidates"] if c["status"] == "accepted")
    assert candidate["fit_residual"] < 1e-4


def test_target_depth_stops_the_selection():
    model = linear_in_disguise()
    x = np.random.default_rng(5).uniform(0, 1, (160, 4, 6, 6)).astype(np.float32)
    _, report = graphfold.fold(model, calibration={"x": x}, refit=RefitOptions(), target_depth=3)
    assert not [r for r in report.rewrites if r.pass_name == LINEARIZE]  # depth 3 already: nothing to do
    assert any("--target-depth 3 reached" in note for note in report.refit["notes"])


def test_target_latency_stops_the_selection():
    model = linear_in_disguise()
    x = np.random.default_rng(5).uniform(0, 1, (160, 4, 6, 6)).astype(np.float32)
    _, report = graphfold.fold(model, calibration={"x": x}, refit=RefitOptions(target_latency=1.0))
    assert not [r for r in report.rewrites if r.pass_name == LINEARIZE]  # x1.00 of itself already
    assert any("--target-latency 1 reached" in note for note in report.refit["notes"])


def test_final_validation_failure_rolls_the_offender_back():
    model = linear_in_disguise()
    x = np.random.default_rng(5).uniform(0, 1, (160, 4, 6, 6)).astype(np.float32)

    def breaking_exact(m):
        """An 'exact' re-fold that negates every fitted conv: the selection never sees it, the
        final validation does."""
        out = onnx.ModelProto()
        out.CopyFrom(m)
        fitted = {n.input[1] for n in out.graph.node if n.name.startswith("refit_")}
        for init in out.graph.initializer:
            if init.name in fitted:
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        return out, [], []

    data = load_calibration({"x": x}, model)
    outcome = RefitStage(model, model, data, RefitOptions(min_agreement=1.0), exact=breaking_exact).run()
    assert outcome.validation.passed
    assert len(outcome.info["rolled_back"]) == 1
    assert not any(n.name.startswith("refit_") for n in outcome.model.graph.node)
    assert any("rolled back" in note for note in outcome.info["notes"])


def _stage(model, arrays, labels=None):
    data = load_calibration(arrays, model, labels=labels)
    return RefitStage(model, model, data, RefitOptions(), exact=lambda m: (m, [], []))


def test_holdout_never_reaches_the_fit():
    model = linear_in_disguise()
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (128, 4, 6, 6)).astype(np.float32)  # the Relu clips: the fit is not exact
    clean = _stage(model, {"x": x})
    held = np.concatenate([b["x"] for b in clean.holdout.batches])
    index = [int(np.flatnonzero((x == h).all(axis=(1, 2, 3)))[0]) for h in held]
    assert len(index) == clean.holdout.samples == 32

    def fitted(arrays):
        stage = _stage(model, arrays)
        stage.current = model
        shaped, outputs = stage.structure(model, Candidate(LINEARIZE, "x", "c", "test"))
        return stage.fit_conv(shaped, outputs[0])[1]

    poisoned = x.copy()
    poisoned[index] = rng.normal(0, 100, poisoned[index].shape)
    before, after = fitted({"x": x}), fitted({"x": poisoned})
    np.testing.assert_array_equal(before.weight, after.weight)
    np.testing.assert_array_equal(before.bias, after.bias)
    # The control: poisoning one sample the fit does see changes the weights.
    seen = next(i for i in range(len(x)) if i not in set(index))
    control = x.copy()
    control[seen] = rng.normal(0, 100, control[seen].shape)
    assert not np.allclose(fitted({"x": control}).weight, before.weight)


# --- refusals --------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    model = linear_in_disguise()
    onnx.save(model, tmp_path / "in.onnx")
    x = np.random.default_rng(8).uniform(0, 1, (160, 4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    np.save(tmp_path / "labels.npy", np.arange(160) % 3)
    np.save(tmp_path / "short_labels.npy", np.arange(100) % 3)
    np.savez(tmp_path / "small.npz", x=x[:100])
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--refit"], "--refit needs --calibration"),
    (["--refit", "--calibration", "{d}/cal.npz", "--max-accuracy-drop", "1"], "--max-accuracy-drop needs --labels"),
    (["--refit", "--calibration", "{d}/small.npz"], "each needs at least 32"),
    (["--refit", "--calibration", "{d}/cal.npz", "--labels", "{d}/short_labels.npy"], "100 labels for 160 samples"),
    (["--refit", "--calibration", "{d}/cal.npz", "--holdout", "1.5"], "--holdout must be"),
    (["--calibration", "{d}/cal.npz", "--max-accuracy-drop", "1"], "add --refit"),
])
def test_refusals_exit_2_with_one_line_and_write_nothing(files, capsys, args, message):
    out = files / "out.onnx"
    code = main([str(files / "in.onnx"), "-o", str(out), *[a.format(d=files) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


# --- end to end on a small trained network -----------------------------------------------------------

def test_refit_on_a_trained_residual_net(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]

    class Unit(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.branch(x))

    net = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), Unit(12), Unit(12), Unit(12),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(6):
        for batch in train.split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
            optimizer.step()
    net.eval()
    torch.onnx.export(net, images[:1], tmp_path / "net.onnx", input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    x_train, y_train = images[train[:480]].numpy(), labels[train[:480]].numpy()  # calibration: seen in training
    x_test, y_test = images[test].numpy(), labels[test].numpy()
    np.savez(tmp_path / "cal.npz", input=x_train)
    np.save(tmp_path / "labels.npy", y_train)
    code = main([str(tmp_path / "net.onnx"), "-o", str(tmp_path / "out.onnx"), "--calibration",
                 str(tmp_path / "cal.npz"), "--labels", str(tmp_path / "labels.npy"), "--refit",
                 "--max-accuracy-drop", "1", "--report", str(tmp_path / "report.json"), "-q"])
    assert code == 0
    original, folded = onnx.load(tmp_path / "net.onnx"), onnx.load(tmp_path / "out.onnx")
    accuracy = [float((run_ort(m, {"input": x_test})[0].argmax(1) == y_test).mean()) for m in (original, folded)]
    assert accuracy[0] > 0.85  # the network learned something, so damage would show
    convs = [sum(n.op_type == "Conv" for n in m.graph.node) for m in (original, folded)]
    assert convs[1] < convs[0]
    assert accuracy[1] >= accuracy[0] - 0.03  # on test samples the run never saw
