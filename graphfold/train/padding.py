"""Move the zero padding of each linear Conv chain onto its first Conv, so graphfold merges it exactly.

Two padded convolutions in sequence do not compose into one convolution at the border: the
intermediate tensor is zero-padded, which is not what the composed kernel sees. A chain whose
padding all sits on the first Conv (``P = sum_i p_i * prod_{j<i} s_j``, the others unpadded) is
one convolution everywhere. Relocation keeps every output whose receptive field does not reach an
intermediate border and changes the border, so fine-tune afterwards (LayerMerge does the same).

A chain is a run of ``nn.Conv2d`` joined only by ``BatchNorm2d``, ``nn.Identity`` and Layer Folding
activations snapped to the identity, where each intermediate tensor has exactly one consumer; it
is found by tracing the model with ``torch.fx``.
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn

from graphfold.train.eps_resnet import EpsilonGate
from graphfold.train.implosion import PriorityScale
from graphfold.train.layer_folding import LayerFoldingActivation
from graphfold.train.skip_fading import SkipWeight

logger = logging.getLogger(__name__)

__all__ = ["linear_conv_chains", "relocate_chain_padding", "relocate_padding"]

_LEAVES = (LayerFoldingActivation, EpsilonGate, PriorityScale, SkipWeight)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _passes_through(module: nn.Module) -> bool:
    """Linear, shape-keeping modules a chain may cross."""
    if isinstance(module, LayerFoldingActivation):
        return module.is_identity
    return isinstance(module, (nn.BatchNorm2d, nn.Identity))


def linear_conv_chains(model: nn.Module) -> list[list[str]]:
    """Qualified names of the Conv2d modules of each linear chain of two or more convs."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())

    def module_of(node: fx.Node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None

    chains: list[list[str]] = []
    in_chain: set[str] = set()
    for node in graph.nodes:
        if not isinstance(module_of(node), nn.Conv2d) or node.target in in_chain:
            continue
        chain, cur = [node.target], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            module = module_of(nxt)
            if isinstance(module, nn.Conv2d):
                chain.append(nxt.target)
            elif module is None or not _passes_through(module):
                break
            cur = nxt
        if len(chain) > 1:
            chains.append(chain)
            in_chain.update(chain)
    return chains


def relocate_chain_padding(convs: list[nn.Conv2d]) -> bool:
    """Move all padding of one chain onto its first conv, in place; False if it had nothing to move."""
    for conv in convs:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only numeric zero padding can be relocated, got {conv}")
    total = list(convs[0].padding)
    scale = list(convs[0].stride)
    moved = False
    for conv in convs[1:]:
        for d in range(2):
            total[d] += conv.padding[d] * scale[d]
            scale[d] *= conv.stride[d]
        moved |= any(conv.padding)
        conv.padding = (0, 0)
    convs[0].padding = tuple(total)
    return moved


@torch.no_grad()
def relocate_padding(model: nn.Module, example: torch.Tensor) -> list[list[str]]:
    """Relocate the padding of every linear chain of ``model`` in place; return the chains changed.

    ``example`` checks that the output shape is unchanged (strides that do not divide the
    spatial size can make it differ; then nothing is changed and ValueError is raised).
    """
    was_training = model.training
    model.eval()
    shape = model(example).shape
    modules = dict(model.named_modules())
    chains = linear_conv_chains(model)
    saved = {name: modules[name].padding for chain in chains for name in chain}
    changed = [chain for chain in chains
               if relocate_chain_padding([modules[name] for name in chain])]
    new_shape = model(example).shape
    model.train(was_training)
    if new_shape != shape:
        for name, padding in saved.items():
            modules[name].padding = padding
        raise ValueError(f"relocating padding changed the output shape {tuple(shape)} -> {tuple(new_shape)}")
    logger.info("relocated padding of %d conv chains", len(changed))
    return changed
