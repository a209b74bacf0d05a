"""epsilon-ResNet strict-identity gates (Yu et al., CVPR 2018, arXiv 1804.01661).

A residual branch output F is multiplied by a gate built from four ReLUs::

    s = max over the batch and all elements of relu(F - eps) + relu(-F - eps)
    w = relu(-L * relu(-L * s + 1) + 1),   L = 1e6

``w`` is 0 when every ``|F| <= eps`` and 1 as soon as one ``|F| > eps + 1/L``; a unit whose gate is
0 adds nothing and is a strict identity. Once its gate closes the branch receives no gradient
from the task loss, so it stays closed. After training, :func:`switched_off_units` finds the units
whose branch stays within eps on calibration data and :func:`deploy_epsilon_resnet` erases them
(they export as plain identities) and drops the remaining gates, which are 1 on that data.

The paper schedules eps up from 0 and adds side classifiers; here :func:`gate_sparsity_loss`, an
L1 on the scale of each gated branch's last BatchNorm, is the push that makes branches shrink
under eps.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphfold.train.residual import Residual, residual_units

logger = logging.getLogger(__name__)

__all__ = [
    "EpsilonGate",
    "deploy_epsilon_resnet",
    "drop_gates",
    "epsilon_gate",
    "gate_sparsity_loss",
    "gated_units",
    "set_epsilon",
    "switched_off_units",
]


def epsilon_gate(f: torch.Tensor, eps: float, big_l: float = 1e6) -> torch.Tensor:
    """The scalar gate of the paper: 0 when all ``|f| <= eps``, 1 when some ``|f| > eps + 1/L``."""
    s = (F.relu(f - eps) + F.relu(-f - eps)).amax()
    return F.relu(-big_l * F.relu(-big_l * s + 1.0) + 1.0)


class EpsilonGate(nn.Module):
    """``f * epsilon_gate(f, eps)``; ``eps`` may be changed during training (see :func:`set_epsilon`)."""

    def __init__(self, eps: float = 2.5, big_l: float = 1e6) -> None:
        super().__init__()
        self.eps = float(eps)
        self.big_l = float(big_l)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f * epsilon_gate(f, self.eps, self.big_l)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def gated_units(model: nn.Module) -> list[tuple[str, Residual]]:
    """Units whose branch carries an epsilon gate and is not erased yet."""
    return [(name, unit) for name, unit in residual_units(model)
            if isinstance(unit.gate, EpsilonGate) and not unit.erased]


def set_epsilon(model: nn.Module, eps: float) -> None:
    """Set eps on every gate (the paper raises eps from 0 after a warm-up)."""
    for _, unit in gated_units(model):
        unit.gate.eps = float(eps)


def _last_batchnorm(branch: nn.Module) -> nn.BatchNorm2d | None:
    norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1] if norms else None


def gate_sparsity_loss(model: nn.Module, lam: float) -> torch.Tensor:
    """``lam * sum |gamma|`` over the last BatchNorm of every gated branch."""
    terms = []
    for _, unit in gated_units(model):
        bn = _last_batchnorm(unit.branch)
        if bn is not None and bn.weight is not None:
            terms.append(bn.weight.abs().sum())
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


@torch.no_grad()
def branch_peaks(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """max |F(x)| of every gated branch over the calibration batches, in eval mode."""
    peaks: dict[str, float] = {}
    hooks = []
    for name, unit in gated_units(model):
        peaks[name] = 0.0

        def record(_module: nn.Module, _inputs: tuple, out: torch.Tensor, name: str = name) -> None:
            peaks[name] = max(peaks[name], float(out.abs().amax()))

        hooks.append(unit.branch.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return peaks


def switched_off_units(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[str]:
    """Names of the gated units whose gate is 0 on every calibration batch (all ``|F| <= eps``)."""
    peaks = branch_peaks(model, batches)
    units = dict(gated_units(model))
    off = [name for name, peak in peaks.items() if peak <= units[name].gate.eps]
    logger.info("epsilon-ResNet: %d of %d gated units switched off", len(off), len(peaks))
    return off


def drop_gates(model: nn.Module) -> None:
    """Replace every remaining gate by the identity: a plain ResNet, every branch still in place.

    Dropping an open gate is what the paper deploys; it differs from the trained model only on an
    input batch whose branch response stays entirely within eps, where that model would gate it off.
    graphfold's ``epsilon`` option can then remove the small branches from the ONNX graph instead.
    """
    for _, unit in gated_units(model):
        unit.gate = nn.Identity()


def deploy_epsilon_resnet(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[str]:
    """Erase the switched-off units and drop the other gates (:func:`drop_gates`); return the erased names."""
    off = switched_off_units(model, batches)
    units = dict(gated_units(model))
    for name in off:
        units[name].erase()
    drop_gates(model)
    return off
