"""Network Implosion: priorities, erasure of the lowest one, and the erase-retrain loop."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from graphfold.train import (  # noqa: E402
    erase_lowest_priority,
    export_onnx,
    implode,
    priority_l1,
    residual_units,
    unit_priorities,
)
from models.resnet_cifar import resnet20  # noqa: E402


def _model():
    torch.manual_seed(0)
    model = resnet20(unit="implosion", width=8).eval()
    for i, (_, unit) in enumerate(residual_units(model)):
        unit.gate.scale.data.fill_([0.9, 0.5, -0.05, 0.7, 0.3, 0.8, 0.6, 0.02, 0.4][i])
    return model


def test_priority_is_abs_scale_and_l1_sums_it():
    model = _model()
    priorities = unit_priorities(model)
    # units.3 and units.6 have projection shortcuts: not erasable by default.
    assert set(priorities) == {f"units.{i}" for i in (0, 1, 2, 4, 5, 7, 8)}
    assert priorities["units.2"] == pytest.approx(0.05)
    assert float(priority_l1(model, 0.1)) == pytest.approx(0.1 * sum([0.9, 0.5, 0.05, 0.7, 0.3, 0.8, 0.6, 0.02, 0.4]))


def test_erasure_removes_the_lowest_priority_unit():
    model = _model()
    x = torch.rand(3, 1, 16, 16)
    assert erase_lowest_priority(model) == "units.7"
    units = dict(residual_units(model))
    assert units["units.7"].erased and sum(u.erased for u in units.values()) == 1
    # The erased unit is now the identity: the unit's output is its input.
    seen = {}
    units["units.7"].register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    model(x)
    assert torch.equal(seen["i"], seen["o"])
    ops = [n.op_type for n in export_onnx(model, None, (1, 1, 16, 16)).graph.node]
    assert ops.count("Conv") == 21 - 2
    assert erase_lowest_priority(model) == "units.2"


def test_implode_stops_at_the_margin_and_keeps_the_last_good_model():
    model = _model()
    retrained = []
    accuracy = iter([97.5, 97.2, 96.0])  # after the 1st, 2nd, 3rd erasure

    def evaluate(m):
        return next(accuracy)

    result = implode(model, retrain=lambda m: retrained.append(m), evaluate=evaluate,
                     margin=1.0, baseline_accuracy=98.0)
    assert result.erased == ["units.7", "units.2"]
    assert [s.accepted for s in result.steps] == [True, True, False]
    assert result.steps[2].unit == "units.4" and len(retrained) == 3
    erased = {name for name, unit in residual_units(result.model) if unit.erased}
    assert erased == {"units.7", "units.2"}
    assert not any(unit.erased for _, unit in residual_units(model))  # the input is left alone
