"""A residual unit that the depth-removing methods share: ``post(skip * shortcut(x) + gate(branch(x)))``.

* ``gate`` scales the branch: an :class:`~graphfold.train.eps_resnet.EpsilonGate` (epsilon-ResNet)
  or a :class:`~graphfold.train.implosion.PriorityScale` (Network Implosion); identity otherwise.
* ``skip`` scales the shortcut: a :class:`~graphfold.train.skip_fading.SkipWeight` whose weight a
  scheduler takes from 1 to 0 (skip fading); at exactly 0 the unit has no Add at all.
* :meth:`Residual.erase` drops the branch: the unit becomes ``post(shortcut(x))``, and a plain
  identity when the shortcut is the identity, the post-activation is ReLU-like and the unit's
  input is known to be non-negative (``relu(x) = x`` for ``x >= 0``), which is the case in a
  post-activation ResNet where every unit's input is a ReLU output.

Which branches may be erased, and when, is each method's business; this module only runs them.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from graphfold.train.layer_folding import ClippedFoldingActivation, LayerFoldingActivation

__all__ = ["Residual", "residual_units"]


def _identity_on_nonnegative(module: nn.Module) -> bool:
    """ReLU, identity, and a ReLU-family Layer Folding activation all return x for x >= 0 (ReLU6 does not)."""
    if isinstance(module, ClippedFoldingActivation):
        return False
    return isinstance(module, (nn.ReLU, nn.Identity, LayerFoldingActivation))


class Residual(nn.Module):
    """``post(skip(shortcut(x)) + gate(branch(x)))`` with erasure and skip fading built in."""

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None = None,
        post: nn.Module | None = None,
        gate: nn.Module | None = None,
        skip: nn.Module | None = None,
        input_nonnegative: bool = False,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()
        self.gate = gate if gate is not None else nn.Identity()
        self.skip = skip
        self.input_nonnegative = input_nonnegative
        self.erased = False

    @property
    def identity_shortcut(self) -> bool:
        return isinstance(self.shortcut, nn.Identity)

    @property
    def skip_removed(self) -> bool:
        """True when the skip weight is exactly 0, so the unit is ``post(gate(branch(x)))``."""
        return self.skip is not None and float(self.skip.weight) == 0.0

    def erase(self) -> None:
        """Drop the branch (and its gate) for good; the unit keeps only its shortcut."""
        self.erased = True
        self.branch = nn.Identity()
        self.gate = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Python-level branches only: the ONNX export traces the one path the unit is in.
        if self.erased:
            if self.identity_shortcut and self.input_nonnegative and _identity_on_nonnegative(self.post):
                return x
            return self.post(self.shortcut(x))
        f = self.gate(self.branch(x))
        if self.skip_removed:
            return self.post(f)
        s = self.shortcut(x)
        if self.skip is not None:
            s = self.skip(s)
        return self.post(s + f)

    def extra_repr(self) -> str:
        return "erased=True" if self.erased else ""


def residual_units(model: nn.Module) -> Iterator[tuple[str, Residual]]:
    """The model's residual units with their qualified names, in definition order."""
    for name, module in model.named_modules():
        if isinstance(module, Residual):
            yield name, module
