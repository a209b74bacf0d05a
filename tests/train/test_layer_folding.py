"""Layer Folding activation: the formula, the regularizer, clipping, snapping and the export."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from graphfold.train import (  # noqa: E402
    LayerFoldingActivation,
    clip_slopes,
    export_onnx,
    slope_regularizer,
    snap_slopes,
)


@pytest.mark.parametrize("num_parameters", [1, 4])
def test_forward_is_the_formula(num_parameters):
    act = LayerFoldingActivation(num_parameters)
    a = torch.tensor([0.3, 0.0, 1.0, 0.7][:num_parameters])
    act.slope.data.copy_(a)
    x = torch.randn(2, 4, 5, 5)
    slope = a.view(1, -1, 1, 1)
    expected = slope * x + (1 - slope) * torch.relu(x)
    torch.testing.assert_close(act(x), expected, rtol=1e-6, atol=1e-6)


def test_regularizer_is_lambda_sum_abs_one_minus_a_squared():
    model = nn.Sequential(LayerFoldingActivation(1), LayerFoldingActivation(3))
    model[0].slope.data.fill_(0.5)
    model[1].slope.data.copy_(torch.tensor([0.0, 0.2, 1.0]))
    value = slope_regularizer(model, lam=0.25)
    expected = 0.25 * (abs(1 - 0.25) + 1 + abs(1 - 0.04) + 0)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    value.backward()  # pulls slopes up: d/da |1 - a^2| = -2a on [0, 1]
    assert float(model[0].slope.grad) == pytest.approx(0.25 * -2 * 0.5)


def test_clip_keeps_slopes_in_unit_interval():
    act = LayerFoldingActivation(3)
    act.slope.data.copy_(torch.tensor([-0.2, 0.5, 1.7]))
    clip_slopes(act)
    assert act.slope.tolist() == [0.0, 0.5, 1.0]


def test_snap_gives_exact_zero_or_one_and_freezes():
    model = nn.Sequential(LayerFoldingActivation(1), LayerFoldingActivation(1), LayerFoldingActivation(2))
    model[0].slope.data.fill_(0.93)
    model[1].slope.data.fill_(0.2)
    model[2].slope.data.copy_(torch.tensor([0.95, 0.1]))
    modes = snap_slopes(model, threshold=0.9)
    assert modes == {"0": "identity", "1": "relu", "2": "mixed"}
    assert model[0].slope.tolist() == [1.0] and model[1].slope.tolist() == [0.0]
    assert model[2].slope.tolist() == [1.0, 0.0]
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(model[0](x), x)
    assert torch.equal(model[1](x), torch.relu(x))
    assert slope_regularizer(model).item() == 0.0  # frozen slopes are out of the regularizer


def _exported_ops(model: nn.Module, shape=(1, 3, 6, 6)) -> tuple[onnx.ModelProto, list[str]]:
    proto = export_onnx(model, None, shape)
    return proto, [node.op_type for node in proto.graph.node]


def test_snapped_identity_exports_as_prelu_with_slopes_exactly_one():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LayerFoldingActivation(1), nn.Conv2d(4, 2, 1))
    model[1].slope.data.fill_(0.97)
    snap_slopes(model)
    proto, ops = _exported_ops(model)
    assert ops == ["Conv", "PRelu", "Conv"]
    prelu = next(n for n in proto.graph.node if n.op_type == "PRelu")
    slopes = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}[prelu.input[1]]
    assert slopes.size == 1 and np.all(slopes == 1.0)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 6, 6)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_snapped_zero_exports_as_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LayerFoldingActivation(1))
    model[1].slope.data.fill_(0.4)
    snap_slopes(model)
    assert _exported_ops(model)[1] == ["Conv", "Relu"]
