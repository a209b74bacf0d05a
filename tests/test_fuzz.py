"""Property-based fuzzing with a fixed budget: random conv graphs must fold to equivalent models
(or be left alone), and no file, however broken, gets more than one clear line and exit code 2.

The conv graphs are 1-D, 2-D or 3-D chains of random blocks: convs with random kernels, strides,
dilations, groups and (asymmetric or auto_pad) pads, BatchNorms, per-channel affine ops, parallel branches whose pads
may or may not line up, identity skips, zero branches, and activations some of which are
identities, sometimes with dynamic dims. Each runs through the default pipeline and
``--fold-all``; the result must pass the checker, have no more nodes, keep its outputs, and
match the original under onnxruntime within graphfold's own validation tolerance.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphfold
from graphfold.cli import main
from graphfold.inputs import spanning_integers
from tests.util import Net, assert_same_outputs, fold_only, run_ort

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
RTOL = 1e-4  # graphfold's validation tolerance (README: 1e-6 + 1e-4 * max|y|)


# --- random conv graphs -----------------------------------------------------------------------

def out_size(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> int:
    return (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1


def draw_pads(draw, total: int, aligned: int | None = None) -> tuple[int, int]:
    """(begin, end) summing to ``total``: ``aligned`` (when feasible) or anywhere."""
    if aligned is not None and 0 <= aligned <= total and draw(st.integers(0, 3)):
        return aligned, total - aligned
    begin = draw(st.integers(0, total))
    return begin, total - begin


def conv_block(draw, n: Net, x: str, shape: list[int], name: str) -> tuple[str, list[int]]:
    """One Conv with random geometry (explicit pads or auto_pad), maybe a BatchNorm after it."""
    cin, spatial = shape[0], shape[1:]
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if cin % g == 0]))
    cout = group * draw(st.integers(1, 3)) if group < cin else draw(st.sampled_from([cin, 2 * cin]))
    kernel = [draw(st.sampled_from([1, 2, 3, 5]))] + [draw(st.sampled_from([1, 3])) for _ in spatial[1:]]
    stride, dilation = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))
    auto_pad = draw(st.sampled_from(["NOTSET"] * 5 + ["SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad == "NOTSET":
        pads = [draw_pads(draw, draw(st.integers(0, dilation * (k - 1)))) for k in kernel]
        out = [out_size(s, k, stride, dilation, *p) for s, k, p in zip(spatial, kernel, pads)]
        attrs = {"pads": [p[0] for p in pads] + [p[1] for p in pads]}
    elif auto_pad == "VALID":
        out = [out_size(s, k, stride, dilation, 0, 0) for s, k in zip(spatial, kernel)]
        attrs = {"auto_pad": auto_pad}
    else:
        dilation = 1  # onnxruntime has no dilated SAME_* convs
        out = [-(-s // stride) for s in spatial]
        attrs = {"auto_pad": auto_pad}
    assume(all(o >= 1 for o in out))
    y = n.conv(x, name, cin, cout, kernel=kernel, bias=draw(st.booleans()), group=group,
               strides=[stride] * len(kernel), dilations=[dilation] * len(kernel), **attrs)
    if draw(st.booleans()):
        y = n.batchnorm(y, f"{name}.bn", cout, epsilon=draw(st.sampled_from([1e-5, 1e-3])))
    return y, [cout, *out]


def branch_block(draw, n: Net, x: str, shape: list[int], name: str) -> tuple[str, list[int]]:
    """sum_i conv_i(x) (+ x, + BN(x)): RepVGG/ACNet branches whose pads may not line up."""
    cin, spatial = shape[0], shape[1:]
    rank = len(spatial)
    big = draw(st.sampled_from([3, 5]))
    stride = draw(st.sampled_from([1, 1, 2]))
    total = draw(st.integers(0, big - 1))  # the largest branch's pads per axis
    begin = draw(st.integers(0, total))
    cout = cin if draw(st.booleans()) else draw(st.integers(1, 6))
    group = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and cout % g == 0]))
    terms = []
    others = st.lists(st.sampled_from([1, 3]), min_size=rank, max_size=rank)
    kernels = [[big] * rank] + draw(st.lists(others, min_size=1, max_size=3))
    for index, kernel in enumerate(kernels):
        spare = [big - k for k in kernel]
        if max(spare) > total:
            continue  # this branch cannot reach the same output size
        pads = [draw_pads(draw, total - s, begin - s // 2) for s in spare]
        y = n.conv(x, f"{name}.{index}", cin, cout, kernel=kernel, bias=draw(st.booleans()), group=group,
                   strides=[stride] * rank, pads=[p[0] for p in pads] + [p[1] for p in pads])
        if draw(st.booleans()):
            y = n.batchnorm(y, f"{name}.{index}.bn", cout)
        terms.append(y)
    same = stride == 1 and cout == cin and total == big - 1
    if same and draw(st.booleans()):
        terms.append(x)
    if same and draw(st.booleans()):
        terms.append(n.batchnorm(x, f"{name}.idbn", cin))
    out = [out_size(s, big, stride, 1, 0, total) for s in spatial]
    assume(all(o >= 1 for o in out) and len(terms) >= 2)
    order = draw(st.permutations(terms))
    if draw(st.booleans()):
        total_out = n.op("Sum", order, f"{name}.sum")
    else:
        total_out = order[0]
        for index, term in enumerate(order[1:]):
            total_out = n.op("Add", [total_out, term], f"{name}.add{index}")
    return total_out, [cout, *out]


def skip_block(draw, n: Net, x: str, shape: list[int], name: str) -> tuple[str, list[int]]:
    """x + F(x), F a 'same' conv (maybe off-centre, maybe dilated), maybe zero, maybe with BN."""
    cin, rank = shape[0], len(shape) - 1
    kernel = draw(st.sampled_from([1, 2, 3, 5]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    total = dilation * (kernel - 1)
    pads = [draw_pads(draw, total, total // 2) for _ in range(rank)]
    zero = draw(st.integers(0, 4)) == 0
    weight = n.const(f"{name}.w", np.zeros((cin, cin) + (kernel,) * rank, np.float32)) if zero else None
    y = n.conv(x, name, cin, cin, kernel=[kernel] * rank, bias=not zero, weight=weight, dilations=[dilation] * rank,
               pads=[p[0] for p in pads] + [p[1] for p in pads])
    if draw(st.booleans()):
        y = n.batchnorm(y, f"{name}.bn", cin, zero=draw(st.integers(0, 3)) == 0)
    terms = [x, y] if draw(st.booleans()) else [y, x]
    return n.op("Add", terms, f"{name}.add"), list(shape)


def affine_block(draw, n: Net, x: str, shape: list[int], name: str) -> tuple[str, list[int]]:
    """A conv, then Mul/Add/Sub/Div by a per-channel (or scalar, or neutral) constant."""
    y, shape = conv_block(draw, n, x, shape, name)
    op = draw(st.sampled_from(["Mul", "Add", "Sub", "Div"]))
    ones = (1,) * (len(shape) - 1)
    form = draw(st.sampled_from([(1, shape[0], *ones), (shape[0], *ones), (1,), ()]))
    if draw(st.integers(0, 3)) == 0:
        value = np.full(form, 1.0 if op in ("Mul", "Div") else 0.0, np.float32)
    else:
        value = n.rng.uniform(0.5, 2.0, form).astype(np.float32) * n.rng.choice([-1, 1], form).astype(np.float32)
    c = n.const(f"{name}.{op.lower()}.c", value)
    return n.op(op, [y, c] if op in ("Sub", "Div") or draw(st.booleans()) else [c, y], f"{name}.{op.lower()}"), shape


def activation(draw, n: Net, x: str, shape: list[int], name: str) -> str:
    channels, ones = shape[0], (1,) * (len(shape) - 1)
    kind = draw(st.sampled_from(["none", "none", "Relu", "ReluRelu", "PRelu1", "PRelu", "LeakyRelu1",
                                 "LeakyRelu", "Clip", "ReluClip", "Sigmoid"]))
    if kind == "none":
        return x
    if kind in ("Relu", "ReluRelu", "ReluClip"):
        x = n.op("Relu", [x], f"{name}.relu")
        if kind == "ReluRelu":
            return n.op("Relu", [x], f"{name}.relu2")
        if kind == "Relu":
            return x
    if kind in ("Clip", "ReluClip"):
        low, high = n.const(f"{name}.lo", np.array(0.0, np.float32)), n.const(f"{name}.hi", np.array(6.0, np.float32))
        return n.op("Clip", [x, low, high], f"{name}.clip")
    if kind.startswith("PRelu"):
        slope = np.ones((channels, *ones), np.float32) if kind == "PRelu1" else \
            n.rng.uniform(0.0, 0.5, (channels, *ones)).astype(np.float32)
        return n.op("PRelu", [x, n.const(f"{name}.slope", slope)], f"{name}.prelu")
    if kind.startswith("LeakyRelu"):
        return n.op("LeakyRelu", [x], f"{name}.leaky", alpha=1.0 if kind == "LeakyRelu1" else 0.1)
    return n.op("Sigmoid", [x], f"{name}.sigmoid")


BLOCKS = {"conv": conv_block, "branches": branch_block, "skip": skip_block, "affine": affine_block}


@st.composite
def conv_graphs(draw) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A random conv net (1-D, 2-D or 3-D) and the concrete input shape to compare it on."""
    rank = draw(st.sampled_from([2, 2, 2, 1, 3]))
    sizes = {1: (5, 20), 2: (5, 13), 3: (4, 7)}[rank]
    channels, spatial = draw(st.integers(1, 6)), [draw(st.integers(*sizes)) for _ in range(rank)]
    dynamic = draw(st.integers(0, 4)) == 0
    dims = ["N", channels, *[f"D{i}" for i in range(rank)]] if dynamic else [1, channels, *spatial]
    n = Net(dims, seed=draw(st.integers(0, 2**16)))
    x, shape, outputs = n.x, [channels, *spatial], []
    for index in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "branches", "skip", "affine"]))
        x, shape = BLOCKS[kind](draw, n, x, shape, f"b{index}")
        x = activation(draw, n, x, shape, f"b{index}")
        if draw(st.integers(0, 5)) == 0:
            outputs.append(x)  # an intermediate that is also a graph output
    outputs.append(x)
    model = n.model(*dict.fromkeys(outputs))
    return model, {"x": [2 if dynamic else 1, channels, *spatial]}


@FUZZ
@given(conv_graphs(), st.booleans())
def test_random_conv_graphs_fold_to_equivalent_models(graph, fold_all):
    model, shapes = graph
    folded, report = fold_only(model, None, fold_all=fold_all, input_shapes=shapes)
    onnx.checker.check_model(folded, full_check=True)
    assert len(folded.graph.node) <= len(model.graph.node)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert all(r.exact for r in report.rewrites)
    assert_same_outputs(model, folded, rtol=RTOL, seeds=(0, 1), shapes=shapes)


@st.composite
def dense_graphs(draw) -> onnx.ModelProto:
    """Chains of Gemm (transB, alpha, beta, bias forms), MatMul (rank 2 or 3), per-feature
    affine ops, BatchNorm and Relu."""
    rank3 = draw(st.booleans())
    features = draw(st.integers(1, 6))
    n = Net(([2, 3] if rank3 else [3]) + [features], seed=draw(st.integers(0, 999)))
    x = n.x
    for index in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["gemm", "matmul", "affine", "bn", "relu"]))
        out = draw(st.integers(1, 6))
        if kind == "gemm" and not rank3:
            trans_b = draw(st.booleans())
            inputs = [x, n.random(f"g{index}.w", [out, features] if trans_b else [features, out], features)]
            bias = draw(st.sampled_from([None, (out,), (1, out), ()]))
            if bias is not None:
                inputs.append(n.random(f"g{index}.b", list(bias)))
            x = n.op("Gemm", inputs, f"g{index}", transB=int(trans_b), alpha=draw(st.sampled_from([1.0, 0.5])),
                     beta=draw(st.sampled_from([1.0, 2.0])))
            features = out
        elif kind in ("gemm", "matmul"):
            x = n.op("MatMul", [x, n.random(f"m{index}.w", [features, out], features)], f"m{index}")
            features = out
        elif kind == "affine":
            op = draw(st.sampled_from(["Mul", "Add", "Sub", "Div"]))
            form = draw(st.sampled_from([(features,), (1, features), ()]))
            value = (n.rng.uniform(0.5, 2, form) * n.rng.choice([-1, 1], form)).astype(np.float32)
            x = n.op(op, [x, n.const(f"a{index}.c", value)], f"a{index}")
        elif kind == "bn" and not rank3:
            x = n.batchnorm(x, f"bn{index}", features)
        else:
            x = n.op("Relu", [x], f"r{index}")
    return n.model(x)


@st.composite
def conv_transpose_graphs(draw) -> onnx.ModelProto:
    """A ConvTranspose (groups, strides, pads, output_padding) followed by a BN or an affine op."""
    cin = draw(st.sampled_from([2, 4, 6]))
    group = draw(st.sampled_from([g for g in (1, 2) if cin % g == 0]))
    per_group, kernel, stride = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    pad = draw(st.integers(0, kernel - 1))
    n = Net([1, cin, 5, 6], seed=draw(st.integers(0, 99)))
    inputs = [n.x, n.random("w", [cin, per_group, kernel, kernel], cin)]
    if draw(st.booleans()):
        inputs.append(n.random("b", [per_group * group]))
    y = n.op("ConvTranspose", inputs, "ct", group=group, strides=[stride] * 2, pads=[pad] * 4,
             output_padding=[draw(st.integers(0, stride - 1))] * 2)
    if draw(st.booleans()):
        y = n.batchnorm(y, "bn", per_group * group)
    else:
        value = n.rng.uniform(0.5, 2, (1, per_group * group, 1, 1)).astype(np.float32)
        y = n.op(draw(st.sampled_from(["Mul", "Add", "Div", "Sub"])), [y, n.const("c", value)], "affine")
    return n.model(y)


@settings(FUZZ, max_examples=60)
@given(st.one_of(dense_graphs(), conv_transpose_graphs()), st.booleans())
def test_random_dense_and_transposed_layers_fold_to_equivalent_models(model, fold_all):
    folded, report = fold_only(model, None, fold_all=fold_all)
    onnx.checker.check_model(folded, full_check=True)
    assert len(folded.graph.node) <= len(model.graph.node)
    assert all(r.exact for r in report.rewrites)
    assert_same_outputs(model, folded, rtol=RTOL)


# --- value ranges: integer dtypes, multi-output producers, batch-sized constants --------------

# Ops onnxruntime's CPU provider runs on each dtype (Relu has no int64 kernel, MaxPool no int32).
RANGE_DTYPES = {np.float32: {"Abs", "Neg", "Relu", "Clip", "Add", "Mul", "Max", "Sigmoid", "MaxPool", "TopK",
                             "Split", "Conv"},
                np.int8: {"Abs", "Neg", "Relu", "Clip", "Add", "Mul", "Max", "MaxPool", "TopK", "Split"},
                np.uint8: {"Abs", "Clip", "Add", "Mul", "Max", "MaxPool", "TopK", "Split"},
                np.int32: {"Abs", "Neg", "Relu", "Clip", "Add", "Mul", "Max", "TopK", "Split"},
                np.int64: {"Abs", "Neg", "Clip", "Add", "Mul", "Max", "TopK", "Split"}}


# Hypothesis starts from (and shrinks towards) the first choice: the subtle producers come first.
MOTIF_ORDER = ["Abs", "MaxPool", "Conv", "TopK", "Split", "Clip", "Add", "Mul", "Neg", "Sigmoid", "Relu", "Max"]
MOTIFS_OFTEN = {"Abs", "MaxPool", "TopK", "Split", "Conv"}


class RangeNet:
    """A chain of ops on a [batch, 2, 4, 4] tensor whose dtype may change (indices are int64)."""

    def __init__(self, draw, dtype, batch: int) -> None:
        self.draw, self.dtype, self.shape = draw, np.dtype(dtype), [batch, 2, 4, 4]
        self.nodes, self.inits, self.count = [], [], 0
        self.rng = np.random.default_rng(draw(st.integers(0, 999)))
        self.x = "x"
        self.input = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(self.dtype), self.shape)

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        names = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
        return names

    def scalar(self, kind: str) -> np.ndarray:
        """A constant of the current dtype: small, or an extreme of the dtype (for floats, large but
        short of overflow: exact folds reassociate sums, which is exact only up to rounding)."""
        if self.dtype.kind == "f":
            value = {"small": self.draw(st.sampled_from([0.0, 0.5, 1.0, 6.0, -1.0])),
                     "extreme": self.draw(st.sampled_from([100.0, -100.0, 1e-30]))}[kind]
        else:
            info = np.iinfo(self.dtype)
            value = {"small": self.draw(st.sampled_from([0, 1, 6, max(int(info.min), -1)])),
                     "extreme": self.draw(st.sampled_from([int(info.min), int(info.max)]))}[kind]
        return np.array(value, self.dtype)

    def operand(self, neutral: float | None, maps: bool = False) -> str:
        """A constant to combine with x: ``neutral`` or not, a scalar, per channel, or a full map
        whose batch dim is x's."""
        form = self.draw(st.sampled_from(["batch-map", "map"] if maps else ["batch-map", "scalar", "channel", "map"]))
        shape = {"scalar": (), "channel": (self.shape[1], 1, 1), "map": (1, *self.shape[1:]),
                 "batch-map": tuple(self.shape)}[form]
        if neutral is not None and self.draw(st.booleans()):
            return self.const(np.full(shape, neutral, self.dtype))
        value = self.scalar(self.draw(st.sampled_from(["small", "small", "extreme"])))
        noise = self.rng.integers(-2, 3, shape) if self.dtype.kind != "f" else self.rng.standard_normal(shape)
        with np.errstate(over="ignore"):
            return self.const(np.asarray(value + noise.astype(self.dtype), self.dtype))

    def step(self, motif: str | None = None) -> None:
        """One motif: a producer whose range a fold might reason about, then usually an op that
        is removable exactly when that reasoning is right (Relu, Clip, Max)."""
        ops = RANGE_DTYPES[self.dtype.type]
        follow = motif is not None or self.draw(st.integers(0, 3)) > 0
        # The producers whose ranges are subtle come up more often.
        motif = motif or self.draw(st.sampled_from([op for op in sorted(ops - {"Relu", "Max"}, key=MOTIF_ORDER.index)
                                                    for _ in range(3 if op in MOTIFS_OFTEN else 1)]))
        x = self.x
        if motif == "Clip":
            self.clip(x)
        elif motif in ("Add", "Mul"):
            operand = self.operand(1.0 if motif == "Mul" else 0.0)
            self.x, = self.node(motif, [operand, x] if self.draw(st.booleans()) else [x, operand])
        elif motif == "MaxPool":
            if "Sigmoid" in ops and not self.draw(st.booleans()):
                x, = self.node("Sigmoid", [x])
            outputs = self.node("MaxPool", [x], 2, kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1])
            self._pick(outputs, np.int64)
        elif motif == "TopK":
            axis = self.draw(st.sampled_from([a for a in (1, 2, 3) if self.shape[a] >= 2]))
            outputs = self.node("TopK", [x, self.const(np.array([2], np.int64))], 2, axis=axis)
            self.shape[axis] = 2
            self._pick(outputs, np.int64)
        elif motif == "Split" and any(d % 2 == 0 for d in self.shape[1:]):
            axis = self.draw(st.sampled_from([a for a in (1, 2, 3) if self.shape[a] % 2 == 0]))
            half = self.shape[axis] // 2
            outputs = self.node("Split", [x, self.const(np.array([half, half], np.int64))], 2, axis=axis)
            self.x = self.draw(st.sampled_from(outputs))
            self.shape[axis] = half
        elif motif == "Conv":
            # Add(x, map) -> padded Conv -> Add(map): sink-constant-adds' candidate.
            a, = self.node("Add", [x, self.operand(None, maps=True)])
            weight = self.const(self.rng.standard_normal((self.shape[1], self.shape[1], 3, 3)).astype(np.float32))
            conv, = self.node("Conv", [a, weight], pads=[1, 1, 1, 1])
            self.x, = self.node("Add", [conv, self.operand(0.0, maps=True)])
        else:
            self.x, = self.node(motif if motif != "Split" else "Abs", [x])
        if follow:
            sensitive = self.draw(st.sampled_from([op for op in ("Relu", "Clip", "Max")
                                                   if op in RANGE_DTYPES[self.dtype.type]]))
            if sensitive == "Clip":
                self.clip(self.x)
            elif sensitive == "Max":
                self.x, = self.node("Max", [self.x, self.const(np.zeros((), self.dtype))])
            else:
                self.x, = self.node("Relu", [self.x])

    def clip(self, x: str) -> None:
        """Clip to [0, 1], [-1, 6], the dtype's extremes... (low <= high)."""
        if self.dtype.kind == "f":
            low, high = self.draw(st.sampled_from([0.0, -1.0, -3e38])), self.draw(st.sampled_from([1.0, 6.0, 3e38]))
        else:
            info = np.iinfo(self.dtype)
            low = self.draw(st.sampled_from([0, max(int(info.min), -1), int(info.min)]))
            high = self.draw(st.sampled_from([1, 6, int(info.max)]))
        self.x, = self.node("Clip", [x, self.const(np.array(low, self.dtype)), self.const(np.array(high, self.dtype))])

    def _pick(self, outputs: list[str], index_dtype) -> None:
        """Go on from the indices (a new dtype, so other ops may follow) or from the values."""
        if self.draw(st.sampled_from(["indices", "values"])) == "values":
            self.x = outputs[0]
        else:
            self.x, self.dtype = outputs[1], np.dtype(index_dtype)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "ranges", [self.input], [onnx.ValueInfoProto(name=o) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        typed = {v.name: v for v in inferred.graph.value_info}
        for out in model.graph.output:
            out.CopyFrom(typed[out.name])
        onnx.checker.check_model(model, full_check=True)
        return model


@st.composite
def range_graphs(draw, first: str | None = None) -> onnx.ModelProto:
    """Chains of range-sensitive ops (Relu, Clip, Max) after Abs, indices, splits and constants
    with extreme values or a batch dim, on float and integer inputs, starting with ``first``."""
    dtypes = [np.int8, np.float32, np.float32, np.int32, np.uint8, np.int64]
    dtype = draw(st.sampled_from([d for d in dtypes if first is None or first in RANGE_DTYPES[d]]))
    n = RangeNet(draw, dtype, batch=draw(st.sampled_from([2, 2, 1])))
    outputs = []
    for index in range(draw(st.integers(1, 5))):
        n.step(first if index == 0 else None)
        if draw(st.integers(0, 4)) == 0:
            outputs.append(n.x)
    outputs.append(n.x)
    return n.model(list(dict.fromkeys(outputs)))


def adversarial_feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Inputs where folds go wrong: an integer dtype's extremes (where arithmetic wraps), zeros,
    +-1, large and tiny floats (large short of overflow, which reassociation may move)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if np.issubdtype(dtype, np.integer):
            feeds[vi.name] = spanning_integers(np.dtype(dtype), shape, rng)
            continue
        values = rng.standard_normal(shape) * rng.choice([1.0, 1e-30, 1e4], shape)
        values.reshape(-1)[: 6] = [0.0, -0.0, 1.0, -1.0, 1e4, -1e4][: values.size]
        feeds[vi.name] = rng.permuted(values.reshape(-1)).reshape(shape).astype(dtype)
    return feeds


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, seeds=(0, 1, 2)) -> None:
    """Equal outputs on adversarial inputs: integers exactly, floats up to rounding (inf and NaN
    where the original has them)."""
    for seed in seeds:
        feeds = adversarial_feeds(original, seed)
        for index, (ref, out) in enumerate(zip(run_ort(original, feeds), run_ort(folded, feeds))):
            assert ref.dtype == out.dtype and ref.shape == out.shape, (index, ref.dtype, out.dtype)
            if not np.issubdtype(ref.dtype, np.floating):
                np.testing.assert_array_equal(out, ref, err_msg=f"seed {seed}, output {index}")
                continue
            finite = np.isfinite(ref)
            np.testing.assert_array_equal(np.isfinite(out), finite, err_msg=f"seed {seed}, output {index}")
            np.testing.assert_array_equal(out[~finite], ref[~finite], err_msg=f"seed {seed}, output {index}")
            scale = float(np.max(np.abs(ref[finite]), initial=0.0))
            assert np.all(np.abs(out[finite].astype(np.float64) - ref[finite]) <= RTOL * scale + 1e-6), \
                f"seed {seed}, output {index}"


@pytest.mark.parametrize("first", ["Abs", "MaxPool", "TopK", "Split", "Conv"])
def test_range_sensitive_graphs_fold_to_equivalent_models(first):
    # Each producer leads some chains, so none is left to chance.
    @settings(FUZZ, max_examples=15)
    @given(range_graphs(first), st.booleans(), st.booleans())
    def case(model, fold_all, check):
        fold_and_compare(model, fold_all, check)

    case()


def fold_and_compare(model: onnx.ModelProto, fold_all: bool, check: bool) -> None:
    """The default or --fold-all pipeline, validated or not (--no-check): exact rewrites only, a
    valid model, and outputs equal to the original's on adversarial inputs."""
    with np.errstate(over="ignore", invalid="ignore"):
        folded, report = graphfold.fold(model, fold_all=fold_all, check=check)
    onnx.checker.check_model(folded, full_check=True)
    assert all(r.exact for r in report.rewrites)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert_equivalent(model, folded)


# --- broken and adversarial files through the command line ------------------------------------

def sample_model() -> onnx.ModelProto:
    n = Net([1, 3, 8, 8])
    n.op("Relu", [n.batchnorm(n.conv(n.x, "conv", 3, 4, pads=[1, 1, 1, 1]), "bn", 4)], "y")
    return n.model("y")


def run_cli(capsys, tmp_path, data: bytes, *extra: str) -> tuple[int, str, str]:
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    path.write_bytes(data)
    if out.exists():
        out.unlink()
    try:
        code = main([str(path), "-o", str(out), *extra])
    except SystemExit as exc:
        code = exc.code
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stdout + stderr
    if code == 0:
        onnx.checker.check_model(onnx.load(str(out)))
    else:
        assert code == 2, (code, stderr)
        assert stderr.startswith("graphfold: error: ") and stderr.count("\n") == 1, stderr
        assert not out.exists()
    return code, stdout, stderr


def mutated(model: onnx.ModelProto, change) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    change(copy)
    return copy.SerializeToString()


def _set_dims(dims):
    def change(m):
        shape = m.graph.input[0].type.tensor_type.shape
        for dim, value in zip(shape.dim, dims):
            dim.dim_value = value
        m.graph.output[0].type.tensor_type.ClearField("shape")
    return change


def _graph(nodes, outputs=("y",)):
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [2])],
                              [value(o, TensorProto.FLOAT, [2]) for o in outputs])
    return helper.make_model(graph).SerializeToString()


def _initializer(name_end: str, edit):
    def change(m):
        init = next(i for i in m.graph.initializer if i.name.endswith(name_end))
        init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), init.name))
    return change


def _attr(node_index: int, name: str, value):
    def change(m):
        node = m.graph.node[node_index]
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(name, value)])
    return change


def _external(location: str):
    def change(m):
        init = m.graph.initializer[0]
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", location
    return change


ADVERSARIAL = {
    "empty": lambda m: b"",
    "random bytes": lambda m: np.random.default_rng(0).bytes(1000),
    "truncated": lambda m: m.SerializeToString()[: len(m.SerializeToString()) // 2],
    "huge input dims": lambda m: mutated(m, _set_dims([1, 3, 2**40, 2**40])),
    "huge batch": lambda m: mutated(m, _set_dims([2**62])),
    "initializer without data": lambda m: mutated(m, lambda c: c.graph.initializer[0].ClearField("raw_data")),
    "short raw data": lambda m: mutated(m, lambda c: setattr(c.graph.initializer[0], "raw_data", b"\0" * 10)),
    "cycle": lambda m: _graph([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                               helper.make_node("Add", ["x", "a"], ["y"])]),
    "dangling input": lambda m: _graph([helper.make_node("Add", ["x", "ghost"], ["y"])]),
    "dangling output": lambda m: _graph([helper.make_node("Relu", ["x"], ["a"])]),
    "duplicate tensor names": lambda m: _graph([helper.make_node("Relu", ["x"], ["a"]),
                                                helper.make_node("Neg", ["x"], ["a"]),
                                                helper.make_node("Relu", ["a"], ["y"])]),
    "duplicate initializers": lambda m: mutated(m, lambda c: c.graph.initializer.append(c.graph.initializer[0])),
    "duplicate node names": lambda m: mutated(m, lambda c: [setattr(n, "name", "same") for n in c.graph.node]),
    "no opset": lambda m: mutated(m, lambda c: c.ClearField("opset_import")),
    "opset from the future": lambda m: mutated(m, lambda c: setattr(c.opset_import[0], "version", 99)),
    "unknown op": lambda m: mutated(m, lambda c: setattr(c.graph.node[1], "op_type", "FooBar")),
    "external data missing": lambda m: mutated(m, _external("nowhere.bin")),
    "external data outside the folder": lambda m: mutated(m, _external("../../etc/passwd")),
    "rank-2 conv weight": lambda m: mutated(m, _initializer("conv.w", lambda a: a.reshape(4, 27))),
    "conv bias too long": lambda m: mutated(m, _initializer("conv.b", lambda a: np.concatenate([a, a]))),
    "group 0": lambda m: mutated(m, _attr(0, "group", 0)),
    "stride 0": lambda m: mutated(m, _attr(0, "strides", [0, 0])),
    "pads of the wrong length": lambda m: mutated(m, _attr(0, "pads", [1, 1])),
    "negative BN epsilon": lambda m: mutated(m, _attr(1, "epsilon", -10.0)),
    "negative BN variance": lambda m: mutated(m, _initializer("bn.var", lambda a: -a)),
    "NaN weight": lambda m: mutated(m, _initializer("conv.w", lambda a: np.where(a > 0.5, np.nan, a))),
    "infinite BN scale": lambda m: mutated(m, _initializer("bn.gamma", lambda a: a * np.inf)),
    "no nodes": lambda m: _graph([], outputs=("x",)),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
@pytest.mark.parametrize("check", ["", "--no-check"])
def test_adversarial_file_gets_a_clean_answer(case, check, capsys, tmp_path):
    data = ADVERSARIAL[case](sample_model())
    run_cli(capsys, tmp_path, data, *[a for a in [check] if a])


def test_undefinable_affine_maps_are_declined(capsys, tmp_path):
    """A BatchNorm with var + epsilon <= 0 is left in place, without numpy warnings on stderr."""
    data = ADVERSARIAL["negative BN epsilon"](sample_model())
    code, _, stderr = run_cli(capsys, tmp_path, data)
    assert code == 0 and stderr == ""
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node]


CLI_FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@CLI_FUZZ
@given(data=st.data())
def test_corrupted_model_bytes(data, capsys, tmp_path_factory):
    """Random truncations and byte flips of a valid model: exit 0 with a valid model, or exit 2 and
    one line; never a traceback, never an internal error."""
    raw = bytearray(sample_model().SerializeToString())
    if data.draw(st.booleans(), "truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), "length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), "flips")):
            position = data.draw(st.integers(0, len(raw) - 1), "position")
            raw[position] = data.draw(st.integers(0, 255), "byte")
    run_cli(capsys, tmp_path_factory.mktemp("corrupt"), bytes(raw))


@settings(CLI_FUZZ, max_examples=20)
@given(data=st.binary(min_size=1, max_size=2000))
def test_random_bytes(data, capsys, tmp_path_factory):
    run_cli(capsys, tmp_path_factory.mktemp("bytes"), data)


def test_no_traceback_from_the_installed_command(tmp_path):
    """The real entry point, in its own process: one line on stderr, exit 2."""
    path = tmp_path / "broken.onnx"
    path.write_bytes(sample_model().SerializeToString()[:100])
    result = subprocess.run([sys.executable, "-m", "graphfold", str(path), "-o", str(tmp_path / "out.onnx")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("graphfold: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bench_refusal_is_one_line(tmp_path):
    path = tmp_path / "group0.onnx"
    path.write_bytes(ADVERSARIAL["group 0"](sample_model()))
    result = subprocess.run([sys.executable, "-m", "graphfold", "bench", str(path), "--rounds", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("graphfold: error: "), result.stderr
