"""Padding relocation: chains are found, padding moves to the first conv, the interior is kept."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from graphfold.train import LayerFoldingActivation, linear_conv_chains, relocate_padding, snap_slopes  # noqa: E402
from models.mobilenetv2 import mobilenetv2_small  # noqa: E402


def _chain(strides=(1, 1), slope=1.0):
    torch.manual_seed(0)
    act = LayerFoldingActivation(1, init=slope)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, strides[0], 1), nn.BatchNorm2d(4), act,
                          nn.Conv2d(4, 3, 3, strides[1], 1), nn.ReLU(), nn.Conv2d(3, 3, 3, 1, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    snap_slopes(model)
    return model.eval()


def test_chain_through_identity_activation_and_bn_only():
    assert linear_conv_chains(_chain(slope=1.0)) == [["0", "3"]]
    assert linear_conv_chains(_chain(slope=0.0)) == []  # a ReLU ends the chain


def test_relocation_keeps_the_interior_outputs():
    model = _chain()
    x = torch.randn(2, 2, 12, 12)
    before = model[:4](x)
    assert relocate_padding(model, x[:1]) == [["0", "3"]]
    assert model[0].padding == (2, 2) and model[3].padding == (0, 0)
    after = model[:4](x)
    assert after.shape == before.shape
    # Only outputs whose window reaches the intermediate border (1 pixel wide) change.
    torch.testing.assert_close(after[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # BN's shift reaches the border: it does change


def test_relocated_chain_is_one_convolution_everywhere():
    """With all padding on the first conv, conv2(conv1(x)) equals one 5x5 conv on the padded input."""
    model = _chain()
    relocate_padding(model, torch.zeros(1, 2, 12, 12))
    conv1, bn, conv2 = model[0], model[1], model[3]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w1 = conv1.weight * scale[:, None, None, None]
    b1 = (conv1.bias - bn.running_mean) * scale + bn.bias
    # K[o, i] = sum_m w2[o, m] * w1[m, i] (full convolution): correlate the padded w1 with flipped w2.
    padded = torch.nn.functional.pad(w1.permute(1, 0, 2, 3), (2, 2, 2, 2))
    w = torch.nn.functional.conv2d(padded, conv2.weight.flip(-1, -2)).permute(1, 0, 2, 3)
    b = conv2.bias + (conv2.weight.sum((2, 3)) * b1).sum(1)
    x = torch.randn(2, 2, 12, 12)
    merged = torch.nn.functional.conv2d(x, w, b, padding=2)
    torch.testing.assert_close(model[:4](x), merged, rtol=1e-4, atol=1e-4)


def test_strided_chain_scales_the_moved_padding():
    model = _chain(strides=(2, 1))
    x = torch.randn(1, 2, 12, 12)
    shape = model(x).shape
    relocate_padding(model, x)
    assert model[0].padding == (3, 3) and model(x).shape == shape


def test_mobilenetv2_blocks_become_chains_when_their_activations_fold():
    model = mobilenetv2_small(activation="folding")
    # Unfolded, nothing chains: every project feeds a skip Add as well as the next expand.
    assert linear_conv_chains(model) == []
    for act in model.modules():
        if isinstance(act, LayerFoldingActivation):
            act.slope.data.fill_(1.0)
    snap_slopes(model)
    chains = linear_conv_chains(model)
    assert ["blocks.2.branch.0", "blocks.2.branch.3", "blocks.2.branch.6"] in chains
    x = torch.rand(1, 1, 16, 16)
    relocate_padding(model, x)
    assert model.blocks[2].branch[0].padding == (1, 1) and model.blocks[2].branch[3].padding == (0, 0)
