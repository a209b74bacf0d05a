"""Shared test helpers: build tiny models, run them under onnxruntime, fold them, compare them."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

import graphfold
from graphfold.inputs import make_inputs
from graphfold.report import Report


def model_from_text(text: str) -> onnx.ModelProto:
    """A checked model from ONNX's textual syntax (``onnx.parser``); give the header, e.g.
    ``<ir_version: 8, opset_import: ["" : 17]>``, or the model has no opset."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (),
               opset: int = 17) -> onnx.ModelProto:
    """A checked single-graph model built with ``onnx.helper``."""
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` under onnxruntime's CPU provider with every optimization off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def random_feeds(model: onnx.ModelProto, seed: int = 0,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs, as graphfold's validation makes them."""
    return make_inputs(model, shapes, seed=seed)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = 1e-5,
                        seeds: Sequence[int] = (0, 1),
                        shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Every output of ``b`` within ``rtol * max|a| + 1e-6`` of ``a``'s, on seeded random inputs."""
    for seed in seeds:
        feeds = random_feeds(a, seed, shapes)
        ref, out = run_ort(a, feeds), run_ort(b, feeds)
        assert len(ref) == len(out), f"{len(out)} outputs, expected {len(ref)}"
        for index, (x, y) in enumerate(zip(ref, out)):
            assert x.shape == y.shape, f"output {index}: shape {y.shape} != {x.shape}"
            assert x.dtype == y.dtype, f"output {index}: dtype {y.dtype} != {x.dtype}"
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            scale = float(np.max(np.abs(x64))) if x64.size else 0.0
            err = float(np.max(np.abs(y64 - x64))) if x64.size else 0.0
            assert err <= rtol * scale + 1e-6, \
                f"seed {seed}, output {index}: max abs error {err:.3g} > {rtol} * {scale:.3g} + 1e-6"


def fold_only(model: onnx.ModelProto | str, passes: Sequence[str] | None,
              **kw) -> tuple[onnx.ModelProto, Report]:
    """``graphfold.fold`` without validation: the tests compare numerically themselves."""
    return graphfold.fold(model, passes=passes, check=False, **kw)


def op_types(model: onnx.ModelProto) -> list[str]:
    """Op types of the top-level graph's nodes, in graph order."""
    return [node.op_type for node in model.graph.node]
