"""epsilon-ResNet gate: the four-ReLU formula, the switched-off list and the deployed export."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from graphfold.train import (  # noqa: E402
    EpsilonGate,
    deploy_epsilon_resnet,
    epsilon_gate,
    export_onnx,
    residual_units,
    switched_off_units,
)
from models.resnet_cifar import resnet20  # noqa: E402


def _paper_gate(f: np.ndarray, eps: float, big_l: float = 1e6) -> float:
    """The gate exactly as written in the paper's code, in float32 numpy."""
    relu = lambda v: np.maximum(v, np.float32(0))  # noqa: E731
    f = f.astype(np.float32)
    s = np.max(relu(f - np.float32(eps)) + relu(-f - np.float32(eps)))
    return float(relu(relu(s * np.float32(-big_l) + np.float32(1.0)) * np.float32(-big_l) + np.float32(1.0)))


@pytest.mark.parametrize("peak,expected", [(0.5, 0.0), (1.999, 0.0), (2.0, 0.0), (2.01, 1.0), (50.0, 1.0)])
def test_gate_equals_its_formula(peak, expected):
    rng = np.random.default_rng(0)
    f = rng.uniform(-1, 1, size=(4, 3, 5, 5)).astype(np.float32)
    f[1, 2, 3, 4] = -peak  # the peak sets max|F|; negative on purpose, the gate is symmetric
    gate = epsilon_gate(torch.from_numpy(f), eps=2.0)
    assert gate.shape == ()
    assert float(gate) == expected == _paper_gate(f, 2.0)
    out = EpsilonGate(eps=2.0)(torch.from_numpy(f))
    assert torch.equal(out, torch.from_numpy(f) * expected)


def test_gate_between_eps_and_eps_plus_one_over_l_is_the_linear_ramp():
    f = torch.tensor([2.0 + 4e-7])  # s = 4e-7 -> relu(1 - 0.4) = 0.6 -> relu(1 - 6e5) = 0
    assert float(epsilon_gate(f, 2.0)) == _paper_gate(f.numpy(), 2.0) == 0.0
    f = torch.tensor([2.0 + 2e-6])
    assert float(epsilon_gate(f, 2.0)) == 1.0


def _silence(unit) -> None:
    """Make a unit's branch exactly zero: its last BatchNorm gets gamma = beta = 0."""
    bn = unit.branch[-1]
    bn.weight.data.zero_()
    bn.bias.data.zero_()


def test_switched_off_units_are_erased_and_export_as_identities():
    torch.manual_seed(0)
    model = resnet20(unit="epsilon", eps=1e-3, width=8).eval()
    units = dict(residual_units(model))
    _silence(units["units.1"])  # identity shortcut
    _silence(units["units.3"])  # projection shortcut: keeps its 1x1 conv
    x = torch.rand(6, 1, 16, 16)
    assert switched_off_units(model, [x]) == ["units.1", "units.3"]
    expected = model(x)
    convs_before = sum(n.op_type == "Conv" for n in export_onnx(model, None, (1, 1, 16, 16)).graph.node)
    erased = deploy_epsilon_resnet(model, [x])
    assert erased == ["units.1", "units.3"]
    assert units["units.1"].erased and units["units.3"].erased and not units["units.2"].erased
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    proto = export_onnx(model, None, (1, 1, 16, 16))
    ops = [n.op_type for n in proto.graph.node]
    assert convs_before == 21
    assert ops.count("Conv") == 21 - 2 - 2  # units.1 drops both convs, units.3 keeps its projection
    assert not {"ReduceMax", "Mul"} & set(ops)  # open gates are gone from the deployed model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected.detach().numpy(),
                               rtol=1e-4, atol=1e-4)
