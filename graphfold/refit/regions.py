"""Where a refit can replace part of a network: single-input single-output regions of an ONNX graph.

A *cut* is a tensor through which every path from the graph's inputs to its outputs passes: in
topological order, the only computed tensor still live after its producer (a dominator of the
outputs). Between two cuts ``a`` and ``b`` lies a region whose nodes read nothing computed
outside it but ``a`` and feed nothing outside it but ``b``: it can be replaced by any operator
from ``a``'s shape to ``b``'s without touching the rest. No node names are read.

Two kinds of candidates are found on such regions:

- *linearize*: a region of convs and elementwise ops with at least one nonlinearity, ending in a
  linear op, becomes ONE Conv (k x k, the region's stride, padding that keeps the shape);
- *erase*: a region ``b = Add(a, F(a))`` (a residual unit with an identity skip) loses its
  branch ``F``; the convs of the region after it are refit to compensate.

Both keep the region's output tensor name, so targets read from the original model by tensor
name stay valid as rewrites accumulate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops a fitted conv may replace: convs and ops acting on each element (or channel) alone.
LINEAR_OPS = {"Conv", "Add", "Sub", "BatchNormalization", "Mul", "Identity", "Dropout"}
NONLINEAR_OPS = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "PRelu", "Tanh", "Elu",
                 "Selu", "Gelu", "Softplus", "Mish", "Swish"}
REGION_OPS = LINEAR_OPS | NONLINEAR_OPS
MAX_REGION_CONVS = 6  # two inverted residuals
MAX_UNITS = 2
Shapes = Mapping[str, Sequence[int | None]]


@dataclass
class Cut:
    tensor: str
    position: int  # index of its producer in the node list (-1 for a graph input)


@dataclass
class Region:
    """Nodes ``start..stop`` (inclusive) of the graph, reading ``source`` and writing ``target``."""

    source: str
    target: str
    start: int
    stop: int
    convs: int
    nonlinear: int
    spatial_kernel: bool  # some conv has a kernel larger than 1x1
    skip_add: int | None = None  # position of a final Add(source, F) (identity-skip residual)
    notes: list[str] = field(default_factory=list)


def constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return names


def cuts(graph: onnx.GraphProto) -> list[Cut]:
    """The graph's cut tensors in topological order (nodes must be topologically sorted)."""
    constants = constant_names(graph)
    inputs = [vi.name for vi in graph.input if vi.name not in constants]
    outputs = {vi.name for vi in graph.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = index
    live = {name for name in inputs if name in last_use or name in outputs}
    found = [Cut(inputs[0], -1)] if len(inputs) == 1 else []
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue
        live.update(o for o in node.output if o and (o in last_use or o in outputs))
        live = {name for name in live if last_use.get(name, -1) > index or name in outputs}
        if len(live) == 1 and next(iter(live)) in node.output:
            found.append(Cut(next(iter(live)), index))
    return found


def regions(graph: onnx.GraphProto, max_convs: int = MAX_REGION_CONVS, max_units: int = MAX_UNITS) -> list[Region]:
    """Every region between two cuts that a fitted conv could replace (see the module docstring).

    A region spans at most ``max_units`` units, so one fitted conv stands for one or two blocks. A
    unit ends at a cut written by a residual Add, or where two linear ops meet across a cut (a
    block's projecting conv feeding the next block's conv): not inside a block, where every
    conv output goes through an activation.
    """
    found = []
    all_cuts = cuts(graph)
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for i, first in enumerate(all_cuts):
        units = 1
        for last in all_cuts[i + 1:]:
            region = describe(graph, first, last)
            # Longer regions only add nodes: once one holds a foreign op or too much, stop.
            if region is None or region.convs > max_convs or units > max_units:
                break
            found.append(region)
            op = graph.node[last.position].op_type
            after = consumers.get(last.tensor, [])
            if region.convs and (op in ("Add", "Sum") or (op in LINEAR_OPS and after
                                                           and all(c in LINEAR_OPS for c in after))):
                units += 1
    return found


def _ops_ok(graph: onnx.GraphProto, start: int, stop: int) -> bool:
    return all(n.op_type in REGION_OPS or n.op_type == "Constant" for n in graph.node[start:stop + 1])


def describe(graph: onnx.GraphProto, first: Cut, last: Cut) -> Region | None:
    """The region between two cuts, or None if it holds an op a conv cannot stand for."""
    start, stop = first.position + 1, last.position
    if not _ops_ok(graph, start, stop):
        return None
    nodes = graph.node[start:stop + 1]
    convs = sum(n.op_type == "Conv" for n in nodes)
    nonlinear = sum(n.op_type in NONLINEAR_OPS for n in nodes)
    spatial = any(n.op_type == "Conv" and _kernel(graph, n) != (1, 1) for n in nodes)
    region = Region(first.tensor, last.tensor, start, stop, convs, nonlinear, spatial)
    final = graph.node[stop]
    if final.op_type in ("Add", "Sum") and len(final.input) == 2 and first.tensor in final.input \
            and final.input[0] != final.input[1]:
        region.skip_add = stop
    return region


def _kernel(graph: onnx.GraphProto, node: onnx.NodeProto) -> tuple[int, ...]:
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return tuple(attr.ints)
    weight = initializer(graph, node.input[1]) if len(node.input) > 1 else None
    return tuple(weight.shape[2:]) if weight is not None else (0, 0)


def initializer(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def linearize_reason(graph: onnx.GraphProto, region: Region, shapes: Shapes) -> str | None:
    """Why ``region`` cannot become one fitted conv (None: it can)."""
    if region.convs == 0:
        return "holds no conv"
    if region.nonlinear == 0:
        return "is linear already: the exact passes decide it"
    last = graph.node[region.stop]
    if last.op_type not in LINEAR_OPS:
        return f"ends in a {last.op_type}, which a linear conv cannot reproduce"
    first = graph.node[region.start]
    if first.op_type in NONLINEAR_OPS:
        return f"starts with a {first.op_type}: the region without it is the candidate"
    geometry = region_geometry(region, shapes)
    return geometry if isinstance(geometry, str) else None


@dataclass
class Geometry:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]


def region_geometry(region: Region, shapes: Shapes) -> Geometry | str:
    """The conv that maps the region's input shape to its output shape, keeping the grid."""
    source, target = shapes.get(region.source), shapes.get(region.target)
    if source is None or target is None or len(source) != 4 or len(target) != 4:
        return "its input or output is not an [N, C, H, W] tensor of known rank"
    if None in source[1:] or None in target[1:]:
        return "its channels or spatial size are not known"
    k = 3 if region.spatial_kernel else 1
    strides = []
    for size, out in zip(source[2:], target[2:]):
        stride = max(1, round(size / out))
        if (size + 2 * (k // 2) - k) // stride + 1 != out:
            return f"no {k}x{k} conv maps spatial size {list(source[2:])} to {list(target[2:])}"
        strides.append(stride)
    return Geometry(int(source[1]), int(target[1]), (k, k), tuple(strides), (k // 2,) * 4)


def erase_reason(graph: onnx.GraphProto, region: Region, shapes: Shapes) -> str | None:
    if region.skip_add is None:
        return "is not a residual unit with an identity skip"
    source, target = shapes.get(region.source), shapes.get(region.target)
    if source is None or target is None or tuple(source) != tuple(target):
        return "the skip and the unit's output differ in shape"
    return None


# --- rewriting -----------------------------------------------------------------------------------

def replace_region(model: onnx.ModelProto, region: Region, nodes: Sequence[onnx.NodeProto],
                   initializers: Sequence[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """A copy of ``model`` with the region's nodes replaced by ``nodes`` (writing its target)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = list(out.graph.node[:region.start]) + list(nodes) + list(out.graph.node[region.stop + 1:])
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(initializers)
    drop_unused_initializers(out.graph)
    return out


def conv_node(name: str, source: str, target: str, weight_name: str, bias_name: str, kernel: Sequence[int],
              strides: Sequence[int], pads: Sequence[int], group: int = 1) -> onnx.NodeProto:
    return helper.make_node("Conv", [source, weight_name, bias_name], [target], name=name,
                            kernel_shape=list(kernel), strides=list(strides), pads=list(pads), group=group)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {vi.name for vi in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {init.name for init in graph.initializer} | {n.name for n in graph.node}
    taken |= {o for n in graph.node for o in n.output}
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name


def find_region(graph: onnx.GraphProto, source: str, target: str) -> Region | None:
    """The region between the cuts ``source`` and ``target`` in this graph, if both still are cuts."""
    by_name = {c.tensor: c for c in cuts(graph)}
    if source not in by_name or target not in by_name or by_name[source].position >= by_name[target].position:
        return None
    return describe(graph, by_name[source], by_name[target])


def conv_geometry(graph: onnx.GraphProto, node: onnx.NodeProto) -> dict | None:
    """A Conv's attributes as the fit needs them, with explicit pads (None for auto_pad or dilation)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = initializer(graph, node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.ndim != 4:
        return None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return None
    return {"kernel": tuple(weight.shape[2:]), "strides": tuple(attrs.get("strides", [1, 1])),
            "pads": tuple(attrs.get("pads", [0, 0, 0, 0])), "group": int(attrs.get("group", 1)),
            "out_channels": int(weight.shape[0]), "in_channels": int(weight.shape[1] * attrs.get("group", 1)),
            "dtype": weight.dtype}


def elements(shape: Sequence[int | None] | None) -> int:
    return math.prod(int(d) if d else 1 for d in shape) if shape else 0
