"""Skip fading: the schedule, and a faded skip exports without its Add."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from graphfold.train import Residual, SkipFadeScheduler, SkipWeight, export_onnx, skip_free  # noqa: E402
from models.resnet_cifar import resnet20  # noqa: E402


def _unit() -> Residual:
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return Residual(branch, post=nn.ReLU(), skip=SkipWeight(1.0)).eval()


def _ops(model: nn.Module) -> list[str]:
    return [n.op_type for n in export_onnx(model, None, (1, 4, 6, 6)).graph.node]


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_schedule_goes_from_one_to_zero(shape):
    weights = [SkipWeight(), SkipWeight()]
    scheduler = SkipFadeScheduler(weights, total_steps=100, start=0.2, end=0.6, shape=shape)
    seen = [weights[0].weight] + [scheduler.step() for _ in range(100)]
    assert seen[:21] == [1.0] * 21 and seen[60:] == [0.0] * 41
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert seen[40] == pytest.approx(0.5)
    assert weights[1].weight == 0.0


def test_faded_skip_exports_without_add():
    unit = _unit()
    x = torch.randn(2, 4, 6, 6)
    assert _ops(unit).count("Add") == 1 and "Mul" not in _ops(unit)  # w = 1: a plain residual
    unit.skip.weight = 0.3
    torch.testing.assert_close(unit(x), torch.relu(0.3 * x + unit.branch(x)))
    assert _ops(unit).count("Mul") == 1
    unit.skip.weight = 0.0
    torch.testing.assert_close(unit(x), torch.relu(unit.branch(x)))
    assert _ops(unit) == ["Conv", "Relu", "Conv", "Relu"]


def test_fully_faded_resnet_has_no_add_and_no_projection():
    model = resnet20(unit="fade", width=8)
    scheduler = SkipFadeScheduler([m for m in model.modules() if isinstance(m, SkipWeight)], 10, 0.0, 0.5)
    assert not skip_free(model)
    for _ in range(10):
        scheduler.step()
    assert skip_free(model)
    ops = [n.op_type for n in export_onnx(model, None, (1, 1, 16, 16)).graph.node]
    assert "Add" not in ops and ops.count("Conv") == 19  # stem + 18, the two 1x1 projections gone
