"""The cost model that decides whether a merge pays.

Merging is not always faster: two 3x3 convs (18 C^2 MACs per pixel) merge into a 5x5
(25 C^2). The estimate for a layer is, in multiply-accumulate equivalents,

    cost = MACs * kernel_factor + MEMORY_WEIGHT * (elements read + written) + NODE_OVERHEAD

``kernel_factor`` charges depthwise and large kernels for running below the dense 1x1/3x3
throughput of onnxruntime's conv kernels; the memory term charges the intermediate
tensors a merge removes (an expanded inverted-residual tensor is memory-bound, which MACs
alone miss); elementwise ops cost only their memory traffic, with ``LAYOUT_BREAK`` extra
for ops onnxruntime cannot fuse into its blocked conv layout (a constant-map Add). The
constants were set from single-block measurements under onnxruntime's CPU provider (see
``tools/cost_model_check.py``, which compares predictions with measured latency).
"""
from __future__ import annotations

import math
from typing import Sequence

from graphfold.kernels import ConvParams, output_spatial

MEMORY_WEIGHT = 8.0      # one element moved costs about this many MACs
NODE_OVERHEAD = 2.0e4    # dispatch and allocation per node
DEPTHWISE_FACTOR = 4.0   # depthwise convs reach a fraction of dense throughput
LARGE_KERNEL_FACTOR = 1.25  # kernels over 3x3 lose the tuned paths
LAYOUT_BREAK = 2.0       # an unfusable elementwise op reorders its tensor in and out

# A merge must be estimated strictly cheaper; a tie is not worth a change.
MARGIN = 1.0


def conv_cost(params: ConvParams, in_shape: Sequence[int | None] | None) -> float:
    """Estimated cost of one Conv on an input of ``in_shape`` ([N, C, *spatial])."""
    batch, spatial = _batch_spatial(in_shape, params.rank)
    out = output_spatial(params, [max(s, e) for s, e in zip(spatial, params.extent)]) \
        if spatial else (1,) * params.rank
    out_pixels = batch * math.prod(out)
    per_output = params.weight.shape[1] * math.prod(params.kernel_shape)
    macs = out_pixels * params.out_channels * per_output
    factor = 1.0
    if params.group > 1 and params.weight.shape[1] == 1:
        factor = DEPTHWISE_FACTOR
    elif math.prod(params.kernel_shape) > 9:
        factor = LARGE_KERNEL_FACTOR
    moved = batch * params.in_channels * math.prod(spatial or (1,)) + out_pixels * params.out_channels
    return macs * factor + MEMORY_WEIGHT * moved + NODE_OVERHEAD


def elementwise_cost(shape: Sequence[int | None] | None, inputs: int = 2, unfusable: bool = False) -> float:
    """An Add/Mul and the like: memory traffic only (``inputs`` read, one written)."""
    elements = _elements(shape)
    cost = MEMORY_WEIGHT * elements * (inputs + 1) + NODE_OVERHEAD
    return cost * (1 + LAYOUT_BREAK) if unfusable else cost


def pays(before: float, after: float) -> bool:
    return after < before * MARGIN


def ratio_text(before: float, after: float) -> str:
    return f"estimated cost x{after / before:.2f}" if before > 0 else "estimated cost unknown"


def _elements(shape: Sequence[int | None] | None) -> int:
    if not shape:
        return 1
    return math.prod(int(d) if d else 1 for d in shape)


def _batch_spatial(shape: Sequence[int | None] | None, rank: int) -> tuple[int, tuple[int, ...]]:
    if not shape or len(shape) != rank + 2:
        # Unknown shape: a 32-wide feature map is a neutral guess for comparing layouts.
        return 1, (32,) * rank
    batch = int(shape[0]) if shape[0] else 1
    return batch, tuple(int(d) if d else 32 for d in shape[2:])
