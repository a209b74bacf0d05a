"""graphfold's PyTorch side (the ``train`` extra): train networks that graphfold then folds.

* a user's own model made foldable: :func:`make_foldable` (torch.fx);
* Layer Folding activations: :class:`LayerFoldingActivation`, :func:`slope_regularizer`,
  :func:`clip_slopes`, :func:`snap_slopes`;
* epsilon-ResNet gates: :class:`EpsilonGate`, :func:`gate_sparsity_loss`,
  :func:`deploy_epsilon_resnet`;
* skip fading: :class:`SkipWeight`, :class:`SkipFadeScheduler`;
* Network Implosion: :class:`PriorityScale`, :func:`priority_l1`, :func:`implode`;
* exactness and export: :func:`relocate_padding`, :func:`export_onnx`;
* the shared residual unit :class:`Residual`, the digits data and a small training loop.
"""
from __future__ import annotations

from graphfold.train.convert import ConversionError, make_foldable
from graphfold.train.data import DigitsSplit, load_digits_split
from graphfold.train.eps_resnet import (
    EpsilonGate,
    deploy_epsilon_resnet,
    drop_gates,
    epsilon_gate,
    gate_sparsity_loss,
    set_epsilon,
    switched_off_units,
)
from graphfold.train.export import export_onnx
from graphfold.train.implosion import (
    ImplosionResult,
    PriorityScale,
    erase_lowest_priority,
    implode,
    priority_l1,
    unit_priorities,
)
from graphfold.train.layer_folding import (
    ClippedFoldingActivation,
    LayerFoldingActivation,
    clip_slopes,
    folding_activations,
    slope_regularizer,
    snap_slopes,
)
from graphfold.train.loop import evaluate, fit
from graphfold.train.padding import linear_conv_chains, relocate_padding
from graphfold.train.residual import Residual, residual_units
from graphfold.train.skip_fading import SkipFadeScheduler, SkipWeight, add_skip_weights, skip_free

__all__ = [
    "ClippedFoldingActivation",
    "ConversionError",
    "DigitsSplit",
    "EpsilonGate",
    "ImplosionResult",
    "LayerFoldingActivation",
    "PriorityScale",
    "Residual",
    "SkipFadeScheduler",
    "SkipWeight",
    "add_skip_weights",
    "clip_slopes",
    "deploy_epsilon_resnet",
    "drop_gates",
    "epsilon_gate",
    "erase_lowest_priority",
    "evaluate",
    "export_onnx",
    "fit",
    "folding_activations",
    "gate_sparsity_loss",
    "implode",
    "linear_conv_chains",
    "load_digits_split",
    "make_foldable",
    "priority_l1",
    "relocate_padding",
    "residual_units",
    "set_epsilon",
    "skip_free",
    "slope_regularizer",
    "snap_slopes",
    "switched_off_units",
    "unit_priorities",
]
