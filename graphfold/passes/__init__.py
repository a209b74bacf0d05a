"""The rewrite passes and the default pipeline, in the order it runs them."""
from __future__ import annotations

from typing import Sequence

from graphfold.engine import Pass
from graphfold.errors import UsageError
from graphfold.passes.activations import RemoveIdentityActivations
from graphfold.passes.affine import FoldBatchNorm, FoldChannelAffine
from graphfold.passes.branches import DropZeroBranches, MergeParallelBranches
from graphfold.passes.cleanup import FoldConstants, RemoveDeadNodes, RemoveIdentity
from graphfold.passes.constant_maps import SinkConstantAdds
from graphfold.passes.conv_chain import MergeConvChains
from graphfold.passes.forward_affine import FoldAffineForward
from graphfold.passes.matmul_chain import MergeMatMulChains

# Clean-up first so the folds see plain Conv -> op chains; affine maps fold into the conv
# before them, else into the convs after them, before branches are summed and chains composed. Every pass here is exact.
DEFAULT_PIPELINE: tuple[type[Pass], ...] = (
    FoldConstants,
    RemoveIdentity,
    RemoveDeadNodes,
    FoldBatchNorm,
    FoldChannelAffine,
    FoldAffineForward,
    RemoveIdentityActivations,
    DropZeroBranches,
    MergeParallelBranches,
    MergeConvChains,
    MergeMatMulChains,
    SinkConstantAdds,
)

PASSES: dict[str, type[Pass]] = {p.name: p for p in DEFAULT_PIPELINE}


def build_pipeline(only: Sequence[str] | None = None, skip: Sequence[str] = ()) -> list[Pass]:
    """The default pipeline, restricted to ``only`` and without ``skip`` (pass names)."""
    for name in list(only or []) + list(skip):
        if name not in PASSES:
            raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(PASSES)}")
    chosen = [p for p in DEFAULT_PIPELINE if (not only or p.name in only) and p.name not in skip]
    return [p() for p in chosen]
