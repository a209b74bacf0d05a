"""Small helpers over onnx-graphsurgeon graphs: constants, consumers, splicing, Conv attributes."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from graphfold import external
from graphfold.kernels import ConvParams

# New constants at least this large are spilled to disk when the model's weights are on disk.
SPILL_BYTES = 2**20

# Weight dtypes the numpy algebra handles (bfloat16 and friends are declined).
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class NameScope:
    """Unique tensor and node names for a graph, so rewrites never collide."""

    def __init__(self, graph: gs.Graph) -> None:
        self._used = {t for t in graph.tensors()} | {n.name for n in graph.nodes if n.name}
        self._roots: dict[str, str] = {}  # generated name -> the base it was made from
        # Set when the model's weights stay on disk: new large constants are written there too.
        self.spill: external.Spill | None = None

    def make(self, base: str) -> str:
        base = self._canonical(base)
        name = base
        index = 0
        while name in self._used:
            index += 1
            name = f"{base}_{index}"
        self._used.add(name)
        self._roots[name] = base
        return name

    def _canonical(self, base: str) -> str:
        """Names built from generated names start again from their root, so rewriting the same
        node ten times gives ``conv_merged_10``, not ``conv_merged_1_merged_1_1...``."""
        parts = base.split("_")
        for cut in range(len(parts), 0, -1):
            head = "_".join(parts[:cut])
            if head in self._roots:
                root, tail = self._roots[head], "_".join(parts[cut:])
                tail = f"_{tail}" if tail else ""
                return root if not tail or root.endswith(tail) else root + tail
        return base


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The tensor's value if it is a constant (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        lazy = tensor._values
        if lazy is None:
            raise RuntimeError(f"constant {tensor.name!r} was released when it left the graph, and read after")
        if isinstance(lazy, SparseValues):
            return None  # a sparse initializer is left as it is
        if isinstance(lazy, LazyValues) and external.is_external(lazy.tensor):
            # Weights left on disk are read through a memory map and not cached in the graph.
            return external.read(lazy.tensor)
        if isinstance(lazy, LazyValues) and helper.tensor_dtype_to_np_dtype(lazy.tensor.data_type) != object:
            # graphsurgeon's own load copies every weight twice; one copy is enough.
            tensor.values = numpy_helper.to_array(lazy.tensor)
        return np.asarray(tensor.values)
    if tensor is not None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        value = attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def float_const(tensor: gs.Tensor | None) -> np.ndarray | None:
    """Like ``const_value`` but only for float16/32/64 data, which the weight algebra handles."""
    value = const_value(tensor)
    if value is None or value.dtype not in FLOAT_DTYPES:
        return None
    return value


def broadcast_keeps_shape(shape: Sequence[int | None] | None, value_shape: Sequence[int]) -> bool:
    """True when a constant of ``value_shape``, broadcast against a tensor of ``shape`` (None:
    unknown; a None dim: symbolic), cannot change the tensor's shape.

    Each of the constant's dims must be 1 or equal the tensor's dim. A symbolic dim, the batch
    dim included, takes only 1: any other size would grow a run-time size of 1. A constant of
    higher rank grows the tensor's rank; a scalar (rank 0) never changes anything, even a tensor
    of unknown shape.
    """
    value_shape = tuple(value_shape)
    if not value_shape:
        return True
    if shape is None or len(value_shape) > len(shape):
        return False
    padded = (1,) * (len(shape) - len(value_shape)) + value_shape
    return all(v == 1 or (s is not None and v == s) for v, s in zip(padded, shape))


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def node_label(graph: gs.Graph, node: gs.Node) -> str:
    """The node's name, or for an unnamed one its op and position in the graph ("Relu#3")."""
    if node.name:
        return node.name
    index = next((i for i, n in enumerate(graph.nodes) if n is node), None)
    return f"{node.op}#{'?' if index is None else index}"


def sole_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The only node reading ``tensor``, if it has exactly one and is not a graph output."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def single_use_reason(tensor: gs.Tensor, graph_outputs: set[str]) -> str | None:
    """Why ``tensor`` cannot be folded away (None when it has one consumer and is internal)."""
    if tensor.name in graph_outputs:
        return f"intermediate {tensor.name!r} is a graph output"
    if len(tensor.outputs) > 1:
        return f"intermediate {tensor.name!r} is used by {len(tensor.outputs)} nodes"
    return None


def is_shared(tensor: gs.Tensor, owner: gs.Node) -> bool:
    """True when a weight is also read by a node other than ``owner``."""
    return any(node is not owner for node in tensor.outputs)


def detach(nodes: Iterable[gs.Node]) -> None:
    """Disconnect nodes so the next ``cleanup`` drops them."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()


def release_dead(tensors: Iterable[gs.Tensor], graph_outputs: set[str]) -> None:
    """Drop the values of the constants among ``tensors`` that nothing reads any more.

    A graphsurgeon tensor is a reference cycle (its producer and consumer lists point back at
    it), so a weight that left the graph would stay in memory until the cyclic collector ran:
    while a pass replaces the weights of a large model layer by layer, old and new together.
    Only for a graph without subgraphs, whose tensors' consumer lists are complete.
    """
    for tensor in tensors:
        if isinstance(tensor, gs.Constant) and not tensor.outputs and tensor.name not in graph_outputs:
            tensor._values = None


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of ``old`` at ``new`` (graph outputs are handled by the caller)."""
    for node in list(old.outputs):
        swap(node.inputs, old, new)


def swap(tensors: list, old: gs.Tensor, new: gs.Tensor) -> None:
    """Replace ``old`` by ``new`` in a node's inputs or outputs, item by item: graphsurgeon's
    synchronized lists keep producer/consumer links only through single-item assignment."""
    for index, tensor in enumerate(tensors):
        if tensor is old:
            tensors[index] = new


def make_const(scope: NameScope, base: str, values: np.ndarray) -> gs.Constant:
    """A new constant; large ones go to the scope's spill file when the model's weights are on disk."""
    if scope.spill is not None and values.nbytes >= SPILL_BYTES:
        return scope.spill.constant(scope.make(base), values)
    return gs.Constant(scope.make(base), np.ascontiguousarray(values))


def make_var(scope: NameScope, base: str, like: gs.Tensor | None = None) -> gs.Variable:
    dtype = like.dtype if like is not None else None
    return gs.Variable(scope.make(base), dtype=dtype)


def conv_params(node: gs.Node, in_spatial: Sequence[int | None] | None = None) -> ConvParams | None:
    """The Conv's weights and attributes with pads made explicit, or None if not constant.

    ``auto_pad`` SAME_* needs the input's static spatial size; without it the result is None.
    """
    weight = float_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        return None
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        bias = float_const(node.inputs[2])
        if bias is None:
            return None
    rank = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    strides = tuple(node.attrs.get("strides", [1] * rank))
    dilations = tuple(node.attrs.get("dilations", [1] * rank))
    pads = _explicit_pads(node, kernel, strides, dilations, in_spatial)
    if pads is None:
        return None
    return ConvParams.create(weight, bias, strides=strides, dilations=dilations, pads=pads,
                             group=int(node.attrs.get("group", 1)))


def _explicit_pads(node: gs.Node, kernel: tuple[int, ...], strides: tuple[int, ...],
                   dilations: tuple[int, ...], in_spatial: Sequence[int | None] | None) -> tuple[int, ...] | None:
    rank = len(kernel)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        return tuple(node.attrs.get("pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if in_spatial is None or any(d is None for d in in_spatial):
        return None
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the odd pad at the end, SAME_LOWER at the beginning.
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def conv_attrs(params: ConvParams) -> dict:
    """ONNX Conv attributes for ``params`` (explicit pads, no auto_pad)."""
    return {
        "kernel_shape": [int(k) for k in params.kernel_shape],
        "strides": [int(s) for s in params.strides],
        "dilations": [int(d) for d in params.dilations],
        "pads": [int(p) for p in params.pads],
        "group": int(params.group),
    }


def make_conv(scope: NameScope, name: str, x: gs.Tensor, out: gs.Tensor, params: ConvParams,
              weight_dtype: np.dtype) -> gs.Node:
    """A Conv node computing ``params`` from ``x`` into ``out`` (bias omitted when it is zero)."""
    inputs = [x, make_const(scope, f"{name}.weight", params.weight.astype(weight_dtype, copy=False))]
    if np.any(params.bias != 0):
        inputs.append(make_const(scope, f"{name}.bias", params.bias.astype(weight_dtype)))
    return gs.Node("Conv", scope.make(name), attrs=conv_attrs(params), inputs=inputs, outputs=[out])


def bypass_reason(node: gs.Node, x: gs.Tensor, y: gs.Tensor, graph_outputs: set[str]) -> str | None:
    """Why the pass-through node ``x -> node -> y`` cannot be removed (None when it can)."""
    if y.name not in graph_outputs:
        return None
    # y must keep its name: the tensor feeding the node has to be renamable to y.
    if x.name in graph_outputs:
        return f"{x.name!r} and {y.name!r} are both graph outputs"
    if producer(x) is None:
        return f"graph output {y.name!r} would become a graph input or constant"
    return None


def bypass(node: gs.Node, x: gs.Tensor, y: gs.Tensor, graph_outputs: set[str]) -> None:
    """Remove the pass-through node ``x -> node -> y`` (check ``bypass_reason`` first)."""
    detach([node])
    if y.name in graph_outputs:
        # Keep the graph output's name: x's producer now writes y, and x's readers read y.
        source = producer(x)
        replace_uses(x, y)
        swap(source.outputs, x, y)
    else:
        replace_uses(y, x)
