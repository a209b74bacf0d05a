"""Latency of onnxruntime's fusion patterns kept versus folded away, on single blocks.

For each pattern, two models compute the same function: ``kept`` leaves the pattern as exported,
``folded`` applies the fold a graph optimizer could make (GELU's final ``* 0.5`` into the next
layer, as onnxsim does; a hand-built HardSwish's ``/ 6`` into the next conv, as graphfold's
fold-affine-forward does). Both run under onnxruntime's CPU provider (ORT_ENABLE_ALL, 1 thread),
timed in interleaved rounds by per-process CPU time; the table gives min and median per model and
the folded/kept ratio, plus the ops onnxruntime actually runs after its own fusions (extended
level, so the NCHWc layout nodes do not hide them). This is the evidence behind graphfold's
protected-pattern table (graphfold/fusions.py); docs/fusions.md records its table.

    python tools/fusion_benchmark.py [--rounds 30] [--repeat 20]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphfold  # noqa: E402
from graphfold import kernels  # noqa: E402


class Block:
    """A small model under construction (nodes named after their outputs)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, out: str, cin: int, cout: int, k: int = 1, weight: np.ndarray | None = None) -> str:
        if weight is None:
            weight = self.rng.standard_normal((cout, cin, k, k)) / math.sqrt(cin * k * k)
        bias = self.rng.standard_normal(cout) * 0.1
        return self.op("Conv", [x, self.const(f"{out}.w", weight), self.const(f"{out}.b", bias)], out,
                       pads=[k // 2] * 4)

    def matmul(self, x: str, out: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        y = self.op("MatMul", [x, self.const(f"{out}.w", weight)], out if bias is None else f"{out}.mm")
        return y if bias is None else self.op("Add", [y, self.const(f"{out}.b", bias)], out)

    def model(self, shape: list[int], out: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gelu(b: Block, x: str, half: bool) -> str:
    """torch's GELU export (gelu_fusion.cc pattern 2); without ``half`` the final * 0.5 is left out."""
    d = b.op("Div", [x, b.const("sqrt2", math.sqrt(2))], "g.div")
    e = b.op("Erf", [d], "g.erf")
    a = b.op("Add", [e, b.const("one", 1.0)], "g.add")
    m = b.op("Mul", [x, a], "g.mul")
    return b.op("Mul", [m, b.const("half", 0.5)], "g") if half else m


def hardswish(b: Block, x: str, divide: bool) -> str:
    """x * Relu6(x + 3) / 6 as hand-built in PP-OCR; without ``divide`` the / 6 is left out."""
    a = b.op("Add", [x, b.const("three", 3.0)], "h.add")
    c = b.op("Clip", [a, b.const("lo", 0.0), b.const("hi", 6.0)], "h.clip")
    m = b.op("Mul", [x, c], "h.mul")
    return b.op("Div", [m, b.const("six", 6.0)], "h") if divide else m


def conv_gelu_conv(folded: bool, c: int = 64, h: int = 56) -> onnx.ModelProto:
    b = Block()
    w2 = b.rng.standard_normal((c, c, 1, 1)) / math.sqrt(c)
    y = gelu(b, b.conv("x", "c1", c, c), half=not folded)
    return b.model([1, c, h, h], b.conv(y, "c2", c, c, weight=w2 * 0.5 if folded else w2))


def matmul_gelu_matmul(folded: bool, tokens: int = 196, dim: int = 256) -> onnx.ModelProto:
    b = Block()
    w1 = b.rng.standard_normal((dim, 4 * dim)) / math.sqrt(dim)
    w2 = b.rng.standard_normal((4 * dim, dim)) / math.sqrt(4 * dim)
    y = gelu(b, b.matmul("x", "fc1", w1, np.zeros(4 * dim)), half=not folded)
    return b.model([1, tokens, dim], b.matmul(y, "fc2", w2 * 0.5 if folded else w2, np.zeros(dim)))


def hardswish_conv(folded: bool, c: int = 64, h: int = 56) -> onnx.ModelProto:
    b = Block()
    w2 = b.rng.standard_normal((2 * c, c, 1, 1)) / math.sqrt(c)
    y = hardswish(b, b.conv("x", "c1", c, c, k=3), divide=not folded)
    return b.model([1, c, h, h], b.conv(y, "c2", c, 2 * c, weight=w2 / 6 if folded else w2))


def scale_shift_conv(folded: bool, c: int = 64, h: int = 56) -> onnx.ModelProto:
    """PP-LCNetV3's learnable scale and shift after HardSwish, before a 1x1 conv."""
    b = Block()
    w2 = b.rng.standard_normal((2 * c, c, 1, 1)) / math.sqrt(c)
    y = b.op("HardSwish", [b.conv("x", "c1", c, c, k=3)], "hs")
    if not folded:
        y = b.op("Add", [b.op("Mul", [y, b.const("s", 1.1)], "s.mul"), b.const("t", -0.05)], "t.add")
        return b.model([1, c, h, h], b.conv(y, "c2", c, 2 * c, weight=w2))
    model = scale_shift_conv(False, c, h)
    return graphfold.fold(model, passes=["fold-affine-forward"], check=False)[0]


def shift_conv_relu(folded: bool, c: int = 64, h: int = 56, residual: bool = False) -> onnx.ModelProto:
    """A shift before a padded 3x3 conv (+ residual Add) + Relu. ``folded`` takes the shift into the
    conv's bias with the constant border map a padded conv then needs, an Add between the conv and
    its activation: what fold-affine-forward declines."""
    b = Block()
    w = b.rng.standard_normal((c, c, 3, 3)) / math.sqrt(9 * c)
    shift = b.rng.standard_normal(c).astype(np.float32) * 0.5
    params = kernels.ConvParams.create(w.astype(np.float32), np.zeros(c, np.float32), pads=(1, 1, 1, 1))
    if folded:
        merged = kernels.affine_before_conv(params, 1.0, shift)
        border = kernels.conv_reference(np.broadcast_to(shift.reshape(1, c, 1, 1), (1, c, h, h)), params) \
            - merged.bias.reshape(1, c, 1, 1)
        y = b.op("Conv", ["x", b.const("c1.w", w), b.const("c1.b", merged.bias)], "c1", pads=[1] * 4)
        y = b.op("Add", [y, b.const("border", border)], "c1.border")
    else:
        t = b.op("Add", ["x", b.const("shift", shift.reshape(1, c, 1, 1))], "shifted")
        y = b.op("Conv", [t, b.const("c1.w", w), b.const("c1.b", np.zeros(c))], "c1", pads=[1] * 4)
    if residual:
        y = b.op("Add", [y, b.op("Sigmoid", ["x"], "skip")], "sum")
    return b.model([1, c, h, h], b.op("Relu", [y], "r"))


def matmul_add_matmul(folded: bool, rows: int = 196, dim: int = 256) -> onnx.ModelProto:
    """MatMul + bias Add before another MatMul; ``folded`` moves the bias forward into the second
    (which becomes a Gemm), as fold-affine-forward would without the table."""
    b = Block()
    w1 = b.rng.standard_normal((dim, dim)) / math.sqrt(dim)
    w2 = b.rng.standard_normal((dim, dim)) / math.sqrt(dim)
    bias = b.rng.standard_normal(dim) * 0.1
    if not folded:
        return b.model([rows, dim], b.matmul(b.matmul("x", "fc1", w1, bias), "fc2", w2))
    h = b.matmul("x", "fc1", w1)
    return b.model([rows, dim], b.op("Gemm", [h, b.const("fc2.w", w2), b.const("fc2.b", bias @ w2)], "fc2"))


PATTERNS: dict[str, tuple[Callable[[bool], onnx.ModelProto], str]] = {
    "Gelu before a 1x1 conv (0.5 folded into the conv)": (conv_gelu_conv, "protected: Gelu"),
    "Gelu between MatMuls (0.5 folded into fc2)": (matmul_gelu_matmul, "protected: Gelu"),
    "shift, padded Conv, Relu (shift into a border map)": (shift_conv_relu, "declined: Conv+Relu"),
    "shift, padded Conv, residual Add, Relu (border map)": (lambda f: shift_conv_relu(f, residual=True),
                                                            "declined: Conv+Add+Relu"),
    "MatMul + bias Add before a MatMul (bias moved into it)": (matmul_add_matmul, "protected: MatMul+Add"),
    "hand-built HardSwish before a 1x1 conv (/6 folded)": (hardswish_conv, "not protected: folds"),
    "HardSwish, scale, shift before a 1x1 conv (folded)": (scale_shift_conv, "not protected: folds"),
}


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            save: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if save:
        options.optimized_model_filepath = save
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def runtime_ops(model: onnx.ModelProto) -> list[str]:
    """The ops onnxruntime runs after its own fusions (extended level)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, save=path)
        return [n.op_type for n in onnx.load(path).graph.node]


def measure(models: list[onnx.ModelProto], rounds: int, repeat: int) -> list[list[float]]:
    """Per-model CPU milliseconds per run, one sample per round, models interleaved and rotated."""
    sessions = [session(m) for m in models]
    shape = [d.dim_value for d in models[0].graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    outs = [s.run(None, feeds)[0] for s in sessions]
    for out in outs[1:]:  # the folded model must compute the same function
        np.testing.assert_allclose(out, outs[0], rtol=1e-3, atol=1e-4)
    for s in sessions:
        for _ in range(repeat):
            s.run(None, feeds)
    samples: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        for i in np.roll(np.arange(len(models)), r):
            start = time.process_time()
            for _ in range(repeat):
                sessions[i].run(None, feeds)
            samples[i].append((time.process_time() - start) * 1e3 / repeat)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    head = ["| block | table | kept min / median ms | folded min / median ms | folded/kept (median) | "
            "onnxruntime runs (kept) | onnxruntime runs (folded) |", "|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    for title, (build, verdict) in PATTERNS.items():
        kept, folded = build(False), build(True)
        a, b = measure([kept, folded], args.rounds, args.repeat)
        ratio = float(np.median(b)) / float(np.median(a))
        row = (f"| {title} | {verdict} | {min(a):.3f} / {np.median(a):.3f} | {min(b):.3f} / {np.median(b):.3f} | "
               f"{ratio:.3f} | {', '.join(runtime_ops(kept))} | {', '.join(runtime_ops(folded))} |")
        print(row, flush=True)
    header = (f"onnxruntime {ort.__version__}, CPU provider, ORT_ENABLE_ALL, 1 thread, {args.rounds} interleaved "
              f"rounds of {args.repeat} runs, per-process CPU time")
    print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
