"""ONNX export with a dynamic batch dimension, optionally keeping BatchNorm nodes.

The TorchScript-based exporter (``dynamo=False``) is used: it is fast and traces the one path
that the foldable modules' Python-level switches select (a snapped activation, a removed skip,
an erased unit). In eval mode it folds BatchNorm into the preceding Conv; ``keep_batchnorm=True``
exports with ``TrainingMode.PRESERVE`` instead, so the graph shows ``BatchNormalization`` nodes
for graphfold to fold. That exporter shares equal-valued initializers through ``Identity`` nodes
(gamma = running_var = 1, ...); those are turned back into initializers of their own.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence

import onnx
import torch
from onnx import numpy_helper
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["export_onnx"]


def _inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer under the output name."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    keep, count = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            clone = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            graph.initializer.append(clone)
            count += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return count


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike | None,
    input_shape: Sequence[int],
    keep_batchnorm: bool = False,
    opset: int = 17,
) -> onnx.ModelProto:
    """Export ``model`` in eval mode with input ``input``, output ``logits`` and a dynamic batch.

    ``input_shape`` is one example's shape including the batch dimension, e.g. ``(1, 1, 16, 16)``.
    Returns the ONNX model (checked) and writes it to ``path`` unless that is None.
    """
    was_training = model.training
    model.eval()
    example = torch.zeros(*input_shape)
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    try:
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, training=mode,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    if keep_batchnorm:
        _inline_identity_initializers(proto)
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
        logger.info("exported %s (%d nodes)", path, len(proto.graph.node))
    return proto
