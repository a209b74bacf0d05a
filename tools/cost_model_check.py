"""Check graphfold's cost model against measured onnxruntime latency on single blocks.

For each block pattern and size, build the block as separate Convs, merge it with graphfold
(``fold_all``, so every exact merge is made), and compare the cost model's predicted ratio
merged/original with the latency ratio measured under onnxruntime (CPU, ORT_ENABLE_ALL,
interleaved rounds). The model is right when it predicts the direction: merge where the
merge is faster, decline where it is slower.

    python tools/cost_model_check.py [--threads 1 2] [--rounds 15] [--markdown docs/cost_model.md]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphfold  # noqa: E402
from graphfold import cost  # noqa: E402
from graphfold.bench import bench  # noqa: E402
from graphfold.graph import conv_params  # noqa: E402
from graphfold.shapes import infer_concrete  # noqa: E402


def _conv(nodes, inits, x, cin, cout, k, pad, group=1, stride=1, name="c"):
    rng = np.random.default_rng(len(nodes))
    w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    wn, bn, out = f"{name}{len(nodes)}.w", f"{name}{len(nodes)}.b", f"{name}{len(nodes)}.y"
    inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
    nodes.append(helper.make_node("Conv", [x, wn, bn], [out], kernel_shape=[k, k], pads=[pad] * 4,
                                  group=group, strides=[stride, stride]))
    return out


def block(pattern: str, c: int, h: int) -> onnx.ModelProto:
    nodes, inits = [], []
    x = "x"
    if pattern == "inverted_residual_t6":
        y = _conv(nodes, inits, x, c, 6 * c, 1, 0)
        y = _conv(nodes, inits, y, 6 * c, 6 * c, 3, 1, group=6 * c)
        y = _conv(nodes, inits, y, 6 * c, c, 1, 0)
        nodes.append(helper.make_node("Add", [x, y], ["out"]))
    elif pattern == "repvgg":
        a = _conv(nodes, inits, x, c, c, 3, 1)
        b = _conv(nodes, inits, x, c, c, 1, 0)
        nodes.append(helper.make_node("Add", [a, b], ["s"]))
        nodes.append(helper.make_node("Add", ["s", x], ["out"]))
    elif pattern == "skip_3x3_3x3":  # padding relocated: pad 2 then pad 0, so x + conv(conv(x)) is exact
        y = _conv(nodes, inits, x, c, c, 3, 2)
        y = _conv(nodes, inits, y, c, c, 3, 0)
        nodes.append(helper.make_node("Add", [x, y], ["out"]))
    elif pattern == "3x3_then_1x1":
        y = _conv(nodes, inits, x, c, c, 3, 1)
        nodes.append(helper.make_node("Identity", [_conv(nodes, inits, y, c, c, 1, 0)], ["out"]))
    elif pattern == "1x1_then_3x3":
        y = _conv(nodes, inits, x, c, c // 4 or 1, 1, 0)
        nodes.append(helper.make_node("Identity", [_conv(nodes, inits, y, c // 4 or 1, c, 3, 0)], ["out"]))
    else:
        raise ValueError(pattern)
    graph = helper.make_graph(nodes, pattern, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def predicted_cost(model: onnx.ModelProto) -> float:
    """The cost model's estimate for a whole (small) model: its Convs and elementwise ops."""
    import onnx_graphsurgeon as gs

    shapes = infer_concrete(model)
    graph = gs.import_onnx(model)
    total = 0.0
    for node in graph.nodes:
        if node.op == "Conv":
            total += cost.conv_cost(conv_params(node), shapes.get(node.inputs[0].name))
        elif node.op in ("Add", "Mul"):
            total += cost.elementwise_cost(shapes.get(node.outputs[0].name))
    return total


PATTERNS = ("inverted_residual_t6", "repvgg", "skip_3x3_3x3", "3x3_then_1x1", "1x1_then_3x3")
SIZES = [(8, 112), (32, 56), (32, 112), (128, 28), (256, 14), (512, 7)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    lines = ["| block | C | H | threads | predicted merged/original | measured | direction right | default merges |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    right = total = 0
    for pattern, (c, h) in itertools.product(PATTERNS, SIZES):
        original = block(pattern, c, h)
        merged, _ = graphfold.fold(original, fold_all=True, check=False)
        _, default = graphfold.fold(original, check=False)
        merges = sum(1 for r in default.rewrites if r.pass_name.startswith("merge"))
        predicted = predicted_cost(merged) / predicted_cost(original)
        for threads in args.threads:
            measured = bench([original, merged], threads=threads, rounds=args.rounds).timings[1].ratio
            ok = (predicted < 1) == (measured < 1)
            right += ok
            total += 1
            row = (f"| {pattern} | {c} | {h} | {threads} | {predicted:.2f} | {measured:.2f} | "
                   f"{'yes' if ok else 'NO'} | {'yes' if merges else 'no'} |")
            lines.append(row)
            print(row, flush=True)
    summary = f"\nThe cost model predicted the direction in {right} of {total} cases."
    print(summary)
    if args.markdown:
        command = "python tools/cost_model_check.py " + " ".join(sys.argv[1:])
        with open(args.markdown, "w") as handle:
            handle.write("# Cost model against measured latency\n\n"
                         f"Measured with `{command}` (onnxruntime CPU, ORT_ENABLE_ALL on both sides, "
                         f"{args.rounds} interleaved rounds, median).\n\n")
            handle.write("\n".join(lines) + "\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
