"""Layer Folding activations (Ben Dror et al., BMVC 2022, arXiv 2106.09309).

Each ReLU becomes ``y = a*x + (1-a)*relu(x)`` with a learnable slope ``a`` in [0, 1]. That is exactly
``prelu(x, a)``, so the module exports to ONNX as a ``PRelu``. Training adds
``lambda * sum|1 - a^2|``, which pulls slopes towards 1 (linear) while the task loss keeps the
nonlinearities it needs. After training, :func:`snap_slopes` sets every slope to exactly 0 or 1:

* slope 0 is a plain ReLU and exports as ``Relu`` (onnxruntime fuses it into the Conv);
* slope 1 is the identity and exports as ``PRelu`` with all slopes 1, which graphfold removes
  exactly before merging the now linear Conv chain around it.

Slopes are kept in [0, 1] by projection: call :func:`clip_slopes` after each optimizer step.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ClippedFoldingActivation",
    "LayerFoldingActivation",
    "clip_slopes",
    "folding_activations",
    "slope_regularizer",
    "snap_slopes",
]

_LEARN, _RELU, _IDENTITY, _MIXED = "learn", "relu", "identity", "mixed"


class LayerFoldingActivation(nn.Module):
    """``y = a*x + (1-a)*relu(x)`` with learnable ``a`` in [0, 1], one slope or one per channel.

    ``num_parameters=1`` (one slope for the layer, as in the paper) lets a whole activation become
    an identity; per-channel slopes that snap to a mix of 0 and 1 stay a ``PRelu`` that nothing
    can fold.

    ``negative_slope`` makes it a LeakyReLU's foldable form, ``a*x + (1-a)*leaky_relu(x)``, which
    is a PReLU of slope ``a + (1-a)*negative_slope``; snapped to 0 it exports as ``LeakyRelu``.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.0, negative_slope: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"init slope must lie in [0, 1], got {init}")
        self.slope = nn.Parameter(torch.full((num_parameters,), float(init)))
        self.negative_slope = float(negative_slope)
        self.mode = _LEARN

    @property
    def is_identity(self) -> bool:
        """True once snapped with every slope exactly 1."""
        return self.mode == _IDENTITY

    @property
    def is_relu(self) -> bool:
        """True once snapped with every slope exactly 0."""
        return self.mode == _RELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Branch on a Python attribute, not on tensor values, so tracing exports one fixed op.
        if self.mode == _RELU:
            return F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)
        if self.negative_slope:
            return F.prelu(x, self.slope + (1 - self.slope) * self.negative_slope)
        return F.prelu(x, self.slope)

    def snap(self, threshold: float = 0.9) -> str:
        """Set slopes >= threshold to exactly 1 and the rest to 0, freeze them; return the mode."""
        with torch.no_grad():
            self.slope.copy_((self.slope >= threshold).to(self.slope.dtype))
        self.slope.requires_grad_(False)
        if bool((self.slope == 1).all()):
            self.mode = _IDENTITY
        elif bool((self.slope == 0).all()):
            self.mode = _RELU
        else:
            self.mode = _MIXED
        return self.mode

    def extra_repr(self) -> str:
        leaky = f", negative_slope={self.negative_slope:g}" if self.negative_slope else ""
        return f"num_parameters={self.slope.numel()}{leaky}, mode={self.mode}"


class ClippedFoldingActivation(LayerFoldingActivation):
    """ReLU6's foldable form ``y = a*x + (1-a)*relu6(x)``: snaps to the identity (a = 1) or to ReLU6.

    Snapped to 0 it exports as ``Clip(0, 6)``; snapped to 1 as a ``PRelu`` of slope 1, which
    graphfold removes exactly. Unlike the ReLU form it is not the identity on ``x >= 0``.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.0) -> None:
        super().__init__(num_parameters, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == _RELU:
            return F.relu6(x)
        if self.mode == _IDENTITY:
            return F.prelu(x, self.slope)
        return self.slope * x + (1 - self.slope) * F.relu6(x)

    def extra_repr(self) -> str:
        return f"num_parameters={self.slope.numel()}, clip=(0, 6), mode={self.mode}"


def folding_activations(model: nn.Module) -> Iterator[tuple[str, LayerFoldingActivation]]:
    """The model's Layer Folding activations with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, LayerFoldingActivation):
            yield name, module


def slope_regularizer(model: nn.Module, lam: float = 0.25) -> torch.Tensor:
    """``lam * sum|1 - a^2|`` over every slope still being learned (the paper's lambda is 0.25)."""
    terms = [(1 - act.slope.pow(2)).abs().sum() for _, act in folding_activations(model)
             if act.mode == _LEARN]
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


@torch.no_grad()
def clip_slopes(model: nn.Module) -> None:
    """Project every learnable slope back into [0, 1]; call after each optimizer step."""
    for _, act in folding_activations(model):
        if act.mode == _LEARN:
            act.slope.clamp_(0.0, 1.0)


def snap_slopes(model: nn.Module, threshold: float = 0.9) -> dict[str, str]:
    """Snap every Layer Folding activation (see :meth:`LayerFoldingActivation.snap`).

    Returns the mode each activation ended in, by name: ``identity``, ``relu`` or ``mixed``.
    """
    modes = {name: act.snap(threshold) for name, act in folding_activations(model)}
    n_identity = sum(mode == _IDENTITY for mode in modes.values())
    logger.info("snapped %d activations: %d identity, %d relu", len(modes), n_identity,
                sum(mode == _RELU for mode in modes.values()))
    return modes
