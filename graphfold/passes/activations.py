"""Remove activations and arithmetic that are exact identities.

``PRelu(x, 1) = x``, ``LeakyRelu(x; alpha=1) = x``, ``Relu(x) = x`` and ``Clip(x, a, b) = x``
when x provably stays inside the clipped range (a Relu after a Relu, a Clip(0, 6) after a
Relu6...), ``x * 1 = x``, ``x + 0 = x``, ``x - 0 = x``, ``x / 1 = x`` when the constant does not
broadcast x to a larger shape. Exact: these nodes compute their input. Slopes merely close
to 1 are approximations and are left to ``--snap-slope``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from graphfold.engine import Change, Decision, Exact, FoldContext, Match, Pass, Reject
from graphfold.graph import broadcast_keeps_shape, bypass, bypass_reason, const_value, producer

Range = tuple[float, float]
UNBOUNDED: Range = (-math.inf, math.inf)
# Ops whose output range is their input's (or narrower): max/avg pools, reshapes, transposes.
# AveragePool, Resize and Dropout only in some modes (``_widened``).
RANGE_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                    "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Resize", "Upsample",
                    "Slice", "Gather", "ReduceMax", "ReduceMin", "ReduceMean", "SpaceToDepth", "DepthToSpace"}
FIXED_RANGE = {"Relu": (0.0, math.inf), "Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "Softmax": (0.0, 1.0),
               "Abs": (0.0, math.inf), "Exp": (0.0, math.inf), "Softplus": (0.0, math.inf),
               "Sqrt": (0.0, math.inf), "HardSigmoid": (0.0, 1.0)}
MAX_RANGE_DEPTH = 16
# Ops whose (first) output has their first input's dtype: enough to see through the usual
# chains to a typed graph input or constant when shape inference left intermediates untyped.
SAME_DTYPE = RANGE_PRESERVING | set(FIXED_RANGE) | {
    "Clip", "Neg", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Concat", "Split", "TopK", "Pad", "Tile",
    "Expand", "Conv", "ConvTranspose", "MatMul", "Gemm", "BatchNormalization", "PRelu", "LeakyRelu", "Sign"}
# Second outputs that are indices (int64, never negative): MaxPool's Indices, TopK's Indices.
INDEX_OUTPUTS = {"MaxPool", "TopK"}


def clip_bounds(node: gs.Node) -> Range | None:
    """A Clip's (min, max) from attributes (opset < 11) or constant inputs; None if not constant."""
    low, high = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
    for index, default in ((1, -math.inf), (2, math.inf)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = const_value(node.inputs[index])
            if value is None:
                return None
            bound = float(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else None
            if bound is None:
                return None
            low, high = (bound, high) if index == 1 else (low, bound)
    return float(low), float(high)


def value_range(tensor: gs.Tensor, depth: int = 0) -> Range:
    """Bounds every element of ``tensor`` provably lies in (NaN aside).

    Facts hold per output: a node's other outputs (MaxPool's Indices, Dropout's mask) have
    ranges of their own. Integer arithmetic wraps: ``Abs(-128) = -128`` in int8.
    """
    node = producer(tensor)
    if node is None or depth > MAX_RANGE_DEPTH:
        value = const_value(tensor)
        if value is not None and value.size and np.issubdtype(value.dtype, np.number):
            return float(np.min(value)), float(np.max(value))
        return UNBOUNDED
    if tensor is not node.outputs[0]:
        if node.op == "Split" and node.inputs:
            return value_range(node.inputs[0], depth + 1)
        if node.op in INDEX_OUTPUTS and len(node.outputs) > 1 and tensor is node.outputs[1]:
            return 0.0, math.inf
        return UNBOUNDED
    if node.op == "Abs":
        return _abs_range(node.inputs[0], depth)
    if node.op in FIXED_RANGE:
        low, high = FIXED_RANGE[node.op]
        if node.op == "Relu":
            inner = value_range(node.inputs[0], depth + 1)
            return max(0.0, inner[0]), max(0.0, inner[1])
        return low, high
    if node.op == "Clip":
        bounds = clip_bounds(node)
        if bounds is None:
            return UNBOUNDED
        inner = value_range(node.inputs[0], depth + 1)
        # Clamp both ends: an input range wholly outside the bounds collapses onto one of them.
        return min(max(bounds[0], inner[0]), bounds[1]), min(bounds[1], max(inner[1], bounds[0]))
    if node.op in RANGE_PRESERVING | {"Split", "TopK"} and node.inputs:
        return _widened(node, value_range(node.inputs[0], depth + 1))
    if node.op in ("Concat", "Max", "Min") and node.inputs:
        ranges = [value_range(t, depth + 1) for t in node.inputs]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)
    return UNBOUNDED


def _abs_range(x: gs.Tensor, depth: int) -> Range:
    """The range of ``Abs(x)``: non-negative, except that a signed integer's minimum maps to itself."""
    dtype = tensor_dtype(x)
    if dtype is not None and not np.issubdtype(dtype, np.signedinteger):
        return 0.0, math.inf
    low, high = value_range(x, depth + 1)
    # With the dtype unknown, int8's minimum is the largest a signed minimum can be.
    smallest = float(np.iinfo(dtype).min) if dtype is not None else float(np.iinfo(np.int8).min)
    if low > smallest:
        return (0.0 if low <= 0 <= high else min(abs(low), abs(high))), max(abs(low), abs(high))
    if dtype is None:
        return UNBOUNDED
    return float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)


def tensor_dtype(tensor: gs.Tensor, depth: int = 0) -> np.dtype | None:
    """The element type of ``tensor``: as annotated, or traced back through ops that keep their
    input's type to a typed input, constant or Cast (None when unknown)."""
    if tensor.dtype is not None:
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None  # a type numpy has no name for (bfloat16, float8...)
    node = producer(tensor)
    if node is None or depth > MAX_RANGE_DEPTH:
        return None
    if node.op == "Cast" and "to" in node.attrs:
        to = node.attrs["to"]
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(to) if isinstance(to, int) else to)
        except (TypeError, KeyError):
            return None
    if tensor is not node.outputs[0]:
        if node.op in INDEX_OUTPUTS and tensor is node.outputs[1]:
            return np.dtype(np.int64)
        if node.op != "Split":
            return None
    if node.op in SAME_DTYPE and node.inputs:
        return tensor_dtype(node.inputs[0], depth + 1)
    return None


def _widened(node: gs.Node, inner: Range) -> Range:
    """The output range of a range-preserving op whose mode may let values outside ``inner`` in."""
    low, high = inner
    if node.op == "AveragePool" and node.attrs.get("count_include_pad", 0) and \
            (any(node.attrs.get("pads", [])) or _attr_text(node, "auto_pad") not in ("NOTSET", "VALID")):
        return min(low, 0.0), max(high, 0.0)  # the zero padding is averaged in
    if node.op == "Resize":
        if _attr_text(node, "mode") == "cubic":
            return UNBOUNDED  # cubic interpolation overshoots its samples
        if _attr_text(node, "coordinate_transformation_mode") == "tf_crop_and_resize":
            fill = float(node.attrs.get("extrapolation_value", 0.0))
            return min(low, fill), max(high, fill)
    if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
        training = const_value(node.inputs[2])
        if training is None or bool(training):
            # Training mode zeroes some elements and scales the rest up by 1/(1-ratio).
            return (0.0 if low >= 0 else -math.inf), (0.0 if high <= 0 else math.inf)
    return low, high


def _attr_text(node: gs.Node, name: str) -> str:
    value = node.attrs.get(name, "NOTSET" if name == "auto_pad" else "")
    return value.decode() if isinstance(value, bytes) else str(value)


def identity_reason(ctx: FoldContext, node: gs.Node, x_index: int = 0) -> str | None:
    """Why ``node`` is not an exact identity of its input ``x_index`` (None if it is)."""
    op = node.op
    if op == "PRelu":
        slope = const_value(node.inputs[1])
        if slope is None:
            return "PRelu slope is not constant"
        if not np.all(slope == 1):
            return f"PRelu slopes are not all 1 (min {float(np.min(slope)):.4g}); --snap-slope approximates"
        if broadcast_keeps_shape(ctx.static_shape(node.inputs[0]), slope.shape):
            return None
        return "PRelu slope broadcasts its input larger"
    if op == "LeakyRelu":
        alpha = node.attrs.get("alpha", 0.01)
        return None if alpha == 1 else f"LeakyRelu alpha is {alpha:.4g}, not 1"
    if op == "Relu":
        low = value_range(node.inputs[0])[0]
        return None if low >= 0 else "Relu input can be negative"
    if op == "Clip":
        bounds = clip_bounds(node)
        if bounds is None:
            return "Clip bounds are not constant"
        low, high = value_range(node.inputs[0])
        if bounds[0] <= low and high <= bounds[1]:
            return None
        return f"Clip bounds [{bounds[0]:.4g}, {bounds[1]:.4g}] can bind on input range [{low:.4g}, {high:.4g}]"
    return _arithmetic_reason(ctx, node, x_index)


def _arithmetic_reason(ctx: FoldContext, node: gs.Node, x_index: int) -> str | None:
    neutral = {"Mul": 1, "Div": 1, "Add": 0, "Sub": 0}[node.op]
    value = const_value(node.inputs[1 - x_index])
    if value is None:
        return f"{node.op} operand is not constant"
    if not np.all(value == neutral):
        return f"{node.op} constant is not all {neutral}"
    x = node.inputs[x_index]
    if x.dtype is not None and value.dtype != x.dtype:
        return f"{node.op} constant has another dtype than its input"
    if broadcast_keeps_shape(ctx.static_shape(x), value.shape):
        return None
    return f"{node.op} constant broadcasts its input to a larger shape"


class RemoveIdentityActivations(Pass):
    name = "remove-identity-activations"
    summary = "remove PRelu/LeakyRelu with slope 1, Relu/Clip that cannot bind, x*1, x+0, x-0, x/1"

    OPS = ("PRelu", "LeakyRelu", "Relu", "Clip", "Mul", "Div", "Add", "Sub")

    def match(self, ctx: FoldContext):
        # Only real candidates, so ``inspect`` lists declines worth reading: every PRelu and
        # LeakyRelu, a Relu/Clip whose input has a known range, arithmetic with a neutral constant.
        for node in ctx.graph.nodes:
            if node.op not in self.OPS or not node.inputs or len(node.outputs) != 1:
                continue
            if node.op in ("PRelu", "LeakyRelu"):
                yield Match((node,), {"x": 0})
            elif node.op in ("Relu", "Clip"):
                if value_range(node.inputs[0]) != UNBOUNDED:
                    yield Match((node,), {"x": 0})
            elif len(node.inputs) == 2:
                sides = (0, 1) if node.op in ("Mul", "Add") else (0,)
                for x_index in sides:
                    value = const_value(node.inputs[1 - x_index])
                    if value is not None and np.all(value == (1 if node.op in ("Mul", "Div") else 0)):
                        yield Match((node,), {"x": x_index})
                        break

    def check(self, ctx: FoldContext, match: Match) -> Decision:
        node, x_index = match.anchor, match.data["x"]
        reason = identity_reason(ctx, node, x_index) or \
            bypass_reason(node, node.inputs[x_index], node.outputs[0], ctx.graph_outputs)
        return Reject(reason) if reason else Exact()

    def rewrite(self, ctx: FoldContext, match: Match, decision: Decision) -> Change:
        node = match.anchor
        bypass(node, node.inputs[match.data["x"]], node.outputs[0], ctx.graph_outputs)
        return Change([node], [], f"removed identity {node.op} {node.name!r}")

    def moved_nodes(self, match: Match) -> tuple:
        return ()  # an identity removed leaves nothing for the runtime to fuse

