"""Shared test helpers: build tiny models, run them under onnxruntime, fold them, compare them."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


# --- a small graph builder and fold assertions for the pass tests ---------------------------

FLOAT = TensorProto.FLOAT


class Net:
    """A small model under construction: seeded weights scaled to keep activations near 1, and
    every node named after the tensor it writes."""

    def __init__(self, shape: Sequence[int | str], seed: int = 0, name: str = "x") -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.x = self.input(name, shape)

    def input(self, name: str, shape: Sequence[int | str] | None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, FLOAT, None if shape is None else list(shape)))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def random(self, name: str, shape: Sequence[int], fan_in: int | None = None) -> str:
        scale = 1.0 / np.sqrt(fan_in) if fan_in else 1.0
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op: str, inputs: Sequence[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x: str, out: str, cin: int, cout: int, kernel: int | Sequence[int] = 3, bias: bool = True,
             group: int = 1, weight: str | None = None, **attrs) -> str:
        """Conv ``x -> out`` with random weights (``weight`` names an existing one instead)."""
        kernel = [kernel, kernel] if isinstance(kernel, int) else list(kernel)
        fan_in = cin // group * int(np.prod(kernel))
        inputs = [x, weight or self.random(f"{out}.w", [cout, cin // group, *kernel], fan_in)]
        if bias:
            inputs.append(self.random(f"{out}.b", [cout]))
        return self.op("Conv", inputs, out, group=group, **attrs)

    def batchnorm(self, x: str, out: str, channels: int, zero: bool = False, **attrs) -> str:
        gamma, beta = (np.zeros(channels), np.zeros(channels)) if zero else \
            (self.rng.uniform(0.5, 1.5, channels), self.rng.standard_normal(channels))
        params = [gamma, beta, self.rng.standard_normal(channels), self.rng.uniform(0.5, 1.5, channels)]
        names = [self.const(f"{out}.{key}", value.astype(np.float32))
                 for key, value in zip(("gamma", "beta", "mean", "var"), params)]
        return self.op("BatchNormalization", [x, *names], out, **attrs)

    def model(self, *outputs: str, opset: int = 17) -> onnx.ModelProto:
        """The checked model, its output shapes taken from ONNX shape inference."""
        values = [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs]
        graph = helper.make_graph(self.nodes, "test", self.inputs, values, self.inits)
        draft = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        inferred = onnx.shape_inference.infer_shapes(draft, strict_mode=True).graph.output
        return make_model(self.nodes, self.inputs, list(inferred), self.inits, opset=opset)


def assert_folds(model: onnx.ModelProto, passes: Sequence[str], count: int, ops_after: Sequence[str],
                 shapes: dict | None = None, fold_all: bool = False) -> tuple[onnx.ModelProto, Report]:
    """``passes`` make ``count`` exact rewrites and leave ``ops_after``; onnxruntime agrees within
    1e-5 relative; folding the result again changes nothing."""
    folded, report = fold_only(model, passes, input_shapes=shapes, fold_all=fold_all)
    assert len(report.rewrites) == count, [r.detail for r in report.rewrites]
    assert all(r.exact and r.error_bound is None for r in report.rewrites)
    assert op_types(folded) == list(ops_after), [r.detail for r in report.rewrites]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, folded, shapes=shapes)
    _, again = fold_only(folded, passes, input_shapes=shapes, fold_all=fold_all)
    assert again.rewrites == [], [r.detail for r in again.rewrites]
    return folded, report


def assert_declines(model: onnx.ModelProto, passes: Sequence[str], reason: str, fold_all: bool = False) -> Report:
    """No rewrite, the graph is unchanged, and a decline says ``reason``."""
    folded, report = fold_only(model, passes, fold_all=fold_all)
    assert report.rewrites == [], [r.detail for r in report.rewrites]
    reasons = [d.reason for d in report.declines]
    assert any(reason in text for text in reasons), reasons
    assert op_types(folded) == op_types(model)
    return report


def conv_attrs(model: onnx.ModelProto, index: int = 0) -> dict:
    node = [n for n in model.graph.node if n.op_type == "Conv"][index]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def sample_rate_model(batch: int | str = "N") -> onnx.ModelProto:
    """A model with an int64 scalar ``sr`` input that must be 16000, as silero-vad's: Conv + BN on
    x [batch, 4, 8, 8], then ``If(sr == 16000)``: the then-branch scales by ``16000 / sr``, the
    else-branch reshapes to a shape no input fits, so onnxruntime fails on any other rate."""
    net = Net([batch, 4, 8, 8])
    h = net.batchnorm(net.conv(net.x, "conv", 4, 4, pads=[1, 1, 1, 1]), "bn", 4)
    net.inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
    net.const("rate", np.array(16000, np.int64))
    net.const("rate_f", np.array(16000.0, np.float32))
    net.op("Equal", ["sr", "rate"], "is_16k")
    then = helper.make_graph(
        [helper.make_node("Cast", ["sr"], ["sr_f"], to=FLOAT), helper.make_node("Div", [h, "sr_f"], ["per_rate"]),
         helper.make_node("Mul", ["per_rate", "rate_f"], ["scaled"])],
        "then", [], [helper.make_tensor_value_info("scaled", FLOAT, [batch, 4, 8, 8])])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["bad_shape"], value=numpy_helper.from_array(np.array([7, -1, 13, 1]))),
         helper.make_node("Reshape", [h, "bad_shape"], ["garbage"])],
        "else", [], [helper.make_tensor_value_info("garbage", FLOAT, None)])
    net.nodes.append(helper.make_node("If", ["is_16k"], ["y"], name="by_rate", then_branch=then, else_branch=other))
    return make_model(net.nodes, net.inputs, [helper.make_tensor_value_info("y", FLOAT, [batch, 4, 8, 8])], net.inits)
