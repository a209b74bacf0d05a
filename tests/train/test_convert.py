"""make_foldable on networks graphfold did not write: structure, same function, methods, folded exports."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

import graphfold  # noqa: E402
from graphfold.train import (  # noqa: E402
    ClippedFoldingActivation,
    ConversionError,
    EpsilonGate,
    LayerFoldingActivation,
    PriorityScale,
    SkipFadeScheduler,
    SkipWeight,
    deploy_epsilon_resnet,
    erase_lowest_priority,
    export_onnx,
    folding_activations,
    make_foldable,
    residual_units,
    set_epsilon,
    skip_free,
    snap_slopes,
)
from tests.train.user_models import FunctionalNet, MobileNetV2, ResNet18, SharedActivationNet  # noqa: E402


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that a conversion that drops or reorders a BN shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _same_function(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    original.eval()
    converted.eval()
    with torch.no_grad():
        expected = original(x.clone())
        got = converted(x.clone())
    assert expected.abs().max() > 1e-3  # not a constant-zero network
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_resnet18_every_call_site_and_every_residual():
    torch.manual_seed(0)
    model = _randomize_batchnorm(ResNet18())
    converted = make_foldable(model, X, residuals="implosion")
    # stem + 8 blocks x 2 call sites of the one shared self.relu
    assert _count(converted, LayerFoldingActivation) == 17
    units = dict(residual_units(converted))
    assert len(units) == 8
    assert sum(not u.identity_shortcut for u in units.values()) == 3
    assert all(isinstance(u.gate, PriorityScale) for u in units.values())
    assert all(isinstance(u.post, LayerFoldingActivation) for u in units.values())
    _same_function(model, converted, X)
    assert _count(model, LayerFoldingActivation) == 0  # the input is left alone


def test_mobilenetv2_relu6_sites_and_inverted_residuals():
    torch.manual_seed(0)
    model = _randomize_batchnorm(MobileNetV2())
    converted = make_foldable(model, X, residuals="epsilon")
    relu6_sites = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert _count(converted, ClippedFoldingActivation) == relu6_sites
    assert not any(isinstance(m, nn.ReLU6) for m in converted.modules())
    units = dict(residual_units(converted))
    assert len(units) == sum(b.use_res_connect for b in model.features if hasattr(b, "use_res_connect"))
    assert all(u.identity_shortcut and isinstance(u.gate, EpsilonGate) for u in units.values())
    _same_function(model, converted, X)


def test_functional_activations_and_in_place_semantics():
    torch.manual_seed(0)
    model = FunctionalNet()
    converted = make_foldable(model, X, residuals="fade")
    kinds = sorted(type(m).__name__ + ("-leaky" if getattr(m, "negative_slope", 0) else "")
                   for _, m in folding_activations(converted))
    assert kinds == ["ClippedFoldingActivation"] + ["LayerFoldingActivation"] * 4 + ["LayerFoldingActivation-leaky"]
    assert len(dict(residual_units(converted))) == 1
    _same_function(model, converted, X)


def test_shared_activation_module_becomes_one_per_call():
    torch.manual_seed(0)
    model = SharedActivationNet()
    converted = make_foldable(model, X)
    acts = [m for _, m in folding_activations(converted)]
    assert len(acts) == 3 and len({id(a) for a in acts}) == 3
    _same_function(model, converted, X)
    with torch.no_grad():  # one call site's slope moves only that call site
        before = converted(X)
        acts[1].slope.fill_(1.0)
        assert not torch.allclose(converted(X), before)


def test_train_mode_function_unchanged():
    torch.manual_seed(0)
    model = ResNet18().train()
    converted = make_foldable(model, X, residuals="fade").train()
    torch.testing.assert_close(converted(X), model(X), rtol=0, atol=1e-6)


def _fold_and_compare(model: nn.Module, x: torch.Tensor) -> graphfold.Report:
    exported = export_onnx(model, None, (1, *x.shape[1:]), keep_batchnorm=True)
    folded, report = graphfold.fold(exported)
    assert report.validation is not None and report.validation.passed
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)
    return folded, report


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_resnet18_folding_and_implosion_fold_to_a_smaller_graph():
    torch.manual_seed(0)
    converted = make_foldable(_randomize_batchnorm(ResNet18()), X, residuals="implosion")
    acts = [m for _, m in folding_activations(converted)]
    with torch.no_grad():
        for i, act in enumerate(acts):  # every third call site linear
            act.slope.fill_(1.0 if i % 3 == 1 else 0.2)
        units = dict(residual_units(converted))
        for i, unit in enumerate(units.values()):
            unit.gate.scale.fill_(0.1 if i in (1, 3) else 1.0)
    snap_slopes(converted, 0.9)
    assert erase_lowest_priority(converted) is not None and erase_lowest_priority(converted) is not None
    folded, report = _fold_and_compare(converted, X)
    n_identity = sum(a.is_identity for a in acts)
    assert n_identity > 0
    assert "PRelu" not in _ops(folded)  # every slope-1 activation removed by graphfold
    plain = export_onnx(make_foldable(ResNet18(), X, residuals="implosion"), None, (1, 3, 32, 32))
    assert _ops(folded).count("Add") == _ops(plain).count("Add") - 2  # the two erased units


def test_mobilenetv2_clipped_activations_fold():
    torch.manual_seed(0)
    converted = make_foldable(_randomize_batchnorm(MobileNetV2()), X)
    acts = [m for _, m in folding_activations(converted)]
    with torch.no_grad():
        for i, act in enumerate(acts):
            act.slope.fill_(1.0 if i % 2 else 0.0)
    snap_slopes(converted)
    folded, _ = _fold_and_compare(converted, X)
    assert "PRelu" not in _ops(folded)
    assert _ops(folded).count("Clip") == sum(a.is_relu for a in acts)


def test_epsilon_and_fade_deploy_on_converted_models():
    torch.manual_seed(0)
    gated = make_foldable(_randomize_batchnorm(ResNet18()), X, residuals="epsilon")
    set_epsilon(gated, 1e9)  # every branch within eps: all identity-shortcut units switch off
    erased = deploy_epsilon_resnet(gated, [X])
    assert len(erased) == 8
    _fold_and_compare(gated, X)

    faded = make_foldable(ResNet18(), X, residuals="fade")
    weights = [m for m in faded.modules() if isinstance(m, SkipWeight)]
    scheduler = SkipFadeScheduler(weights, total_steps=4, start=0.0, end=0.5)
    for _ in range(4):
        scheduler.step()
    assert skip_free(faded)
    folded, _ = _fold_and_compare(_randomize_batchnorm(faded), X)
    assert "Add" not in _ops(folded)


# ---- bad input --------------------------------------------------------------------------------

class _DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_module_is_named():
    with pytest.raises(ConversionError, match=r"module 'gate' \(_DataDependent\)"):
        make_foldable(_Untraceable(), X)


def test_unsupported_activation_is_named_or_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GELU())
    with pytest.raises(ConversionError, match=r"module '3' \(GELU\)"):
        make_foldable(model, X)
    kept = make_foldable(model, X, unsupported_activations="keep")
    assert _count(kept, nn.GELU) == 1 and _count(kept, LayerFoldingActivation) == 1
    _same_function(model, kept, X)


class _Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x).mean((2, 3), keepdim=True)


def test_broadcasting_residual_add_is_refused():
    with pytest.raises(ConversionError, match=r"broadcasts \(2, 3, 32, 32\) with \(2, 3, 1, 1\)"):
        make_foldable(_Broadcast(), X, residuals="implosion")
    make_foldable(_Broadcast(), X)  # without residuals the add is not touched


def test_bad_options():
    with pytest.raises(ValueError, match="residuals"):
        make_foldable(ResNet18(), X, residuals="skip")
    with pytest.raises(ValueError, match="activations"):
        make_foldable(ResNet18(), X, activations="relu")
