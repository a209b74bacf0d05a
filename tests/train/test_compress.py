"""compress() end to end on a user's model: the validation rule, the epoch budget, the folded export."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from graphfold.train import evaluate, folding_activations, load_digits_split, residual_units  # noqa: E402
from graphfold.train.compress import (  # noqa: E402
    TrainOptions,
    choose_linear_activations,
    compress,
    conv_depth,
    snap_to,
)
from graphfold.train.convert import make_foldable  # noqa: E402
from tests.train.user_models import MobileNetV2, SharedActivationNet  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split(size=16, val_fraction=0.25)
    return (data.x_train[:640], data.y_train[:640]), (data.x_val, data.y_val), (data.x_test, data.y_test)


def _onnx_logits(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_layer_folding_end_to_end(digits):
    train, val, test = digits
    torch.manual_seed(0)
    result = compress(MobileNetV2(in_channels=1), train, val, "layer-folding", epochs=4, budget=2.0,
                      options=TrainOptions(lr=0.1, seed=0), fold_options={"fold_all": True})
    # the choice kept validation accuracy within the budget, measured right after snapping
    trained, snapped, final = result.stages
    assert snapped.val_accuracy >= trained.val_accuracy - 2.0
    assert final.epochs_so_far == 4 and final.val_accuracy == evaluate(result.model, *val)
    # exactly the named activations are identities, every other one its ReLU6
    modes = {name: act.mode for name, act in folding_activations(result.model)}
    assert {n for n, m in modes.items() if m == "identity"} == set(result.removed)
    assert set(modes.values()) <= {"identity", "relu"}
    # the folded export is the trained model, and it learned something (34% = 3.4x chance)
    logits = _onnx_logits(result.onnx, test[0])
    result.model.eval()
    np.testing.assert_allclose(logits, result.model(test[0]).detach().numpy(), rtol=1e-3, atol=1e-4)
    assert 100.0 * float((logits.argmax(1) == test[1].numpy()).mean()) > 34.0
    assert result.depth == conv_depth(result.onnx) <= result.report.before["convs"]


def test_choice_is_the_longest_prefix_within_the_floor(digits):
    train, val, _ = digits
    torch.manual_seed(0)
    model = make_foldable(SharedActivationNet(in_channels=1), train[0][:2])
    with torch.no_grad():
        for (_, act), slope in zip(folding_activations(model), (0.9, 0.1, 0.5)):
            act.slope.fill_(slope)
    ranked = [name for name, _ in folding_activations(model)]

    def accuracy(k):
        trial = copy.deepcopy(model)
        snap_to(trial, ranked[:k])
        return evaluate(trial, *val)

    accuracies = [accuracy(k) for k in range(len(ranked) + 1)]
    for floor in sorted(set(accuracies)) + [101.0]:
        chosen = choose_linear_activations(model, ranked, val, floor)
        k = len(chosen)
        assert chosen == ranked[:k] and (accuracies[k] >= floor or k == 0)
        assert all(a < floor for a in accuracies[k + 1:])  # no longer prefix qualifies


@pytest.mark.parametrize("method", ["implosion", "epsilon", "fade", "none"])
def test_every_method_spends_exactly_its_epochs(digits, method):
    train, val, test = digits
    torch.manual_seed(0)
    from tools._plain_nets import PlainResNet

    model = PlainResNet(8, 4, 10)
    result = compress(model, train, val, method, epochs=3, budget=100.0, options=TrainOptions(seed=0))
    assert result.stages[-1].epochs_so_far == 3
    if method == "implosion":  # a budget of 100 points accepts every erasure it has epochs for
        assert len(result.removed) >= 1
        assert all(unit.identity_shortcut for name, unit in residual_units(result.model) if unit.erased)
    if method == "fade":
        assert "Add" not in [n.op_type for n in result.onnx.graph.node]
    logits = _onnx_logits(result.onnx, test[0])
    result.model.eval()
    np.testing.assert_allclose(logits, result.model(test[0]).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_random_control_erases_as_many(digits):
    train, val, _ = digits
    from tools._plain_nets import PlainResNet

    torch.manual_seed(0)
    result = compress(PlainResNet(8, 4, 10), train, val, "implosion", epochs=2, options=TrainOptions(seed=0),
                      random_erasures=1, fold=False)
    assert len(result.removed) == 1 and result.stages[-1].epochs_so_far == 2
    with pytest.raises(ValueError, match="control"):
        compress(PlainResNet(8, 4, 10), train, val, "fade", epochs=1, random_erasures=1)


@pytest.mark.parametrize("method", ["layer-folding", "implosion"])
def test_budget_is_measured_against_the_given_reference(digits, method):
    # A first phase far below the reference must not pass the rule against itself: with its own
    # network as the reference the method removes units; against a reference no network of this
    # run reaches, it removes nothing and says the budget was missed.
    train, val, _ = digits
    from tools._plain_nets import PlainResNet

    torch.manual_seed(0)
    model = PlainResNet(8, 4, 10)
    kwargs = dict(epochs=2, budget=2.0, options=TrainOptions(seed=0), fold=False)
    own = compress(model, train, val, method, **kwargs)
    trained = own.stages[0].val_accuracy
    assert own.reference_accuracy == trained and own.within_budget is True
    assert trained < 90.0  # two epochs on 640 images: the reference below is out of reach
    assert len(own.removed) >= 1
    against = compress(model, train, val, method, reference_accuracy=100.0, **kwargs)
    assert against.stages[0].val_accuracy == trained  # the same first phase, judged by another rule
    assert against.reference_accuracy == 100.0
    assert against.removed == [] and against.within_budget is False
