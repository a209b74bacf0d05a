"""ONNX export (BatchNorm kept or folded, dynamic batch) and the reference networks in both forms."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from graphfold.train import export_onnx  # noqa: E402
from models.mobilenetv2 import mobilenetv2_small  # noqa: E402
from models.resnet_cifar import resnet20, resnet56  # noqa: E402
from models.vgg import vgg_small  # noqa: E402


def _randomize_bn(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _run(proto, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("keep_batchnorm", [False, True])
def test_export_matches_torch_with_dynamic_batch(keep_batchnorm):
    torch.manual_seed(0)
    model = resnet20(width=8)
    _randomize_bn(model)
    model.eval()
    proto = export_onnx(model, None, (1, 1, 16, 16), keep_batchnorm=keep_batchnorm)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") == (21 if keep_batchnorm else 0)
    assert "Identity" not in ops  # shared initializers are given back their own copies
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.rand(3, 1, 16, 16)
    np.testing.assert_allclose(_run(proto, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_restores_training_mode():
    model = vgg_small().train()
    export_onnx(model, None, (1, 1, 16, 16))
    assert model.training


@pytest.mark.parametrize("build,convs", [(resnet20, 21), (resnet56, 57), (mobilenetv2_small, 25), (vgg_small, 6)])
def test_reference_networks_plain_and_foldable(build, convs):
    torch.manual_seed(0)
    for activation, act_op in (("relu", "Relu"), ("folding", "PRelu")):
        model = build(activation=activation)
        _randomize_bn(model)
        model.eval()
        proto = export_onnx(model, None, (1, 1, 16, 16))
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("Conv") == convs
        assert act_op in ops and {"Relu", "PRelu"} - {act_op} - set(ops)
        x = torch.rand(2, 1, 16, 16)
        np.testing.assert_allclose(_run(proto, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
