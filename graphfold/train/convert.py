"""Make a user's own network foldable: find its activations and residual adds by tracing with torch.fx.

:func:`make_foldable` returns a converted deep copy (a ``torch.fx.GraphModule``); the input model is
never touched, and when anything cannot be converted it raises :class:`ConversionError` naming the
module or the add, so nothing half-converted comes back.

* Activations (``activations="folding"``): every *call site* of ``nn.ReLU``, ``nn.ReLU6``,
  ``nn.LeakyReLU``, ``F.relu``, ``torch.relu``, ``F.relu6``, ``F.leaky_relu``, ``Tensor.relu``
  and their in-place variants becomes a Layer Folding activation of its own (a module called
  twice becomes two); ReLU6 becomes :class:`ClippedFoldingActivation`. In-place calls keep their
  meaning: later readers of the input read the activation's output. Any other nonlinearity
  (GELU, SiLU, Hardswish, Sigmoid, ...) raises, unless ``unsupported_activations="keep"``, which
  leaves it in place (it then blocks merging across it).
* Residuals (``residuals="implosion" | "epsilon" | "fade"``): every ``a + b`` whose operands both
  derive from one tensor ``x`` through disjoint, self-contained subgraphs (one of them possibly
  ``x`` itself: identity shortcut; or a projection) becomes a
  :class:`~graphfold.train.residual.Residual`: the longer side is the branch, the other the
  shortcut, and an activation that is the add's only consumer is the unit's post-activation. The
  unit carries the method's :class:`PriorityScale`, :class:`EpsilonGate` (eps = 0, so the function
  is unchanged until training raises it) or :class:`SkipWeight`.

At conversion every new piece is the identity of what it replaces (slopes 0, scales 1, skip
weights 1, eps 0), so the converted model computes the original function.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphfold.train.eps_resnet import EpsilonGate
from graphfold.train.implosion import PriorityScale
from graphfold.train.layer_folding import ClippedFoldingActivation, LayerFoldingActivation
from graphfold.train.residual import Residual
from graphfold.train.skip_fading import SkipWeight

logger = logging.getLogger(__name__)

__all__ = ["ConversionError", "make_foldable"]

RESIDUAL_METHODS = ("implosion", "epsilon", "fade")

# graphfold's Residual is traced through: its add is found like any other, so models built from it
# (models/) convert too.
_LEAVES = (LayerFoldingActivation, EpsilonGate, PriorityScale, SkipWeight)
_RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
_RELU_METHODS = {"relu": False, "relu_": True}
_UNSUPPORTED_MODULES = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU,
                        nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus, nn.Hardtanh, nn.RReLU,
                        nn.GLU, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign)
_UNSUPPORTED_FUNCTIONS = {F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
                          torch.tanh, F.tanh, F.elu, F.selu, F.celu, F.mish, F.prelu, F.softplus,
                          F.hardtanh, F.glu, F.logsigmoid}
_UNSUPPORTED_METHODS = {"sigmoid", "tanh", "sigmoid_", "tanh_"}
_ADDS = {operator.add, torch.add, operator.iadd}


class ConversionError(ValueError):
    """The model cannot be made foldable; the message names the module or operation at fault."""


class _Tracer(fx.Tracer):
    """Keeps graphfold's own modules whole and remembers which module a failure happened in."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the one to name
                self.failed_in = (self.path_of_module(m) or "<model>", type(m).__name__)
            raise


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        where = tracer.failed_in or ("<model>", type(model).__name__)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"torch.fx cannot trace module '{where[0]}' ({where[1]}): {first}. Make its forward free of "
            "data-dependent Python control flow, or convert the traceable submodules one by one") from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else "<model>"
    return f"'{node.name}' in module '{owner}'"


def _owner_prefix(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


# ---- activations -------------------------------------------------------------------------------

def _activation_site(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[nn.Module, bool] | None:
    """``(foldable replacement, in_place)`` for a ReLU-family call site, None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if type(module) is nn.ReLU:
            return LayerFoldingActivation(1), module.inplace
        if type(module) is nn.ReLU6:
            return ClippedFoldingActivation(1), module.inplace
        if type(module) is nn.LeakyReLU:
            return LayerFoldingActivation(1, negative_slope=module.negative_slope), module.inplace
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return LayerFoldingActivation(1), _RELU_FUNCTIONS[node.target] or bool(node.kwargs.get("inplace"))
        if node.target is F.relu6:
            return ClippedFoldingActivation(1), bool(node.kwargs.get("inplace"))
        if node.target in (F.leaky_relu, F.leaky_relu_):
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            inplace = node.target is F.leaky_relu_ or bool(
                node.args[2] if len(node.args) > 2 else node.kwargs.get("inplace"))
            return LayerFoldingActivation(1, negative_slope=float(slope)), inplace
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return LayerFoldingActivation(1), _RELU_METHODS[node.target]
    return None


def _unsupported_activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if _activation_site(node, modules) is not None:  # ReLU6 is a Hardtanh subclass
        return None
    if node.op == "call_module" and isinstance(modules[node.target], _UNSUPPORTED_MODULES):
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function" and node.target in _UNSUPPORTED_FUNCTIONS:
        return f"{getattr(node.target, '__name__', node.target)} call {_describe(node)}"
    if node.op == "call_method" and node.target in _UNSUPPORTED_METHODS:
        return f"Tensor.{node.target} call {_describe(node)}"
    return None


def _unique_name(gm: fx.GraphModule, wanted: str, taken: set[str]) -> str:
    existing = dict(gm.named_modules())
    name, k = wanted, 1
    while name in existing or name in taken:
        name, k = f"{wanted}_{k}", k + 1
    taken.add(name)
    return name


def _convert_activations(gm: fx.GraphModule, unsupported: str) -> int:
    modules = dict(gm.named_modules())
    if unsupported == "error":
        for node in gm.graph.nodes:
            what = _unsupported_activation(node, modules)
            if what is not None:
                raise ConversionError(
                    f"cannot make the activation {what} foldable: Layer Folding handles ReLU, ReLU6 and "
                    "LeakyReLU; pass unsupported_activations='keep' to leave such activations as they are")
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sites = [(node, site) for node in gm.graph.nodes
             if (site := _activation_site(node, modules)) is not None]
    replaced: set[str] = set()  # module call sites whose original module name was reused already
    taken: set[str] = set()
    for node, (replacement, in_place) in sites:
        if node.op == "call_module" and node.target not in replaced:
            name = node.target  # the first call keeps the module's own name
            replaced.add(name)
        else:
            base = node.target if node.op == "call_module" else \
                ".".join(filter(None, [_owner_prefix(node), f"{node.name}_fold"]))
            name = _unique_name(gm, base, taken)
        gm.add_submodule(name, replacement)
        source = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (source,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        if in_place and isinstance(source, fx.Node):
            # Later readers of an in-place activation's input read the activated tensor.
            for user in list(source.users):
                if user is not new and order.get(user, -1) > order[node]:
                    user.replace_input_with(source, new)
        gm.graph.erase_node(node)
    return len(sites)


# ---- residual adds -----------------------------------------------------------------------------

def _tensor_ancestors(graph: fx.Graph, upto: fx.Node) -> dict[fx.Node, frozenset]:
    """For each node up to ``upto``: itself and every node it reads from, parameters (get_attr) aside.

    Built in graph order without recursion, so that very deep networks do not hit Python's limit.
    """
    result: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        reads = [result[p] for p in node.all_input_nodes if p.op != "get_attr"]
        result[node] = frozenset({node}.union(*reads))
        if node is upto:
            break
    return result


def _is_activation_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], (LayerFoldingActivation, nn.ReLU, nn.ReLU6, nn.LeakyReLU))
    return _activation_site(node, modules) is not None


def _nonnegative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is ``node``'s output >= 0 whatever the weights become in training (a plain ReLU or ReLU6)?"""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, Residual):
            return isinstance(module.post, (nn.ReLU, nn.ReLU6))
        return type(module) in (nn.ReLU, nn.ReLU6)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS or node.target is F.relu6
    return node.op == "call_method" and node.target in _RELU_METHODS


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, result: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``result`` from ``source`` with copies of ``nodes`` (in order)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # parameters and buffers read with get_attr
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[result])
    return fx.GraphModule(gm, graph, "Subgraph")


def _residual_gate(method: str) -> dict[str, nn.Module]:
    if method == "implosion":
        return {"gate": PriorityScale(1.0)}
    if method == "epsilon":
        return {"gate": EpsilonGate(0.0)}
    return {"skip": SkipWeight(1.0)}


def _convert_one_add(gm: fx.GraphModule, add: fx.Node, method: str, taken: set[str]) -> bool:
    """Rewrite one add into a Residual; False when it is not a residual add (e.g. ``x + bias``)."""
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or add.kwargs.get("alpha", 1) != 1 or any(a.op == "get_attr" for a in operands):
        return False
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    ancestors = _tensor_ancestors(gm.graph, add)
    a, b = operands
    common = ancestors[a] & ancestors[b]
    if not common:
        return False
    source = max(common, key=order.__getitem__)
    shapes = [tuple(o.meta["tensor_meta"].shape) if "tensor_meta" in o.meta else None for o in (a, b)]
    if shapes[0] != shapes[1]:
        raise ConversionError(
            f"the add {_describe(add)} broadcasts {shapes[0]} with {shapes[1]}: a residual unit needs "
            "both sides of the same shape (make the broadcast explicit, e.g. with expand, before the add)")
    inside = ancestors[source]
    sides = [sorted(ancestors[o] - inside, key=order.__getitem__) for o in (a, b)]
    region = set(sides[0]) | set(sides[1])
    for node in region:
        stray = [p for p in node.all_input_nodes if p.op != "get_attr" and p is not source and p not in region]
        leaks = [u for u in node.users if u is not add and u not in region]
        if stray or leaks:
            raise ConversionError(
                f"the add {_describe(add)} is not a self-contained residual unit: '{node.name}' "
                + (f"also reads '{stray[0].name}'" if stray else f"is also read by '{leaks[0].name}'"))
    modules = dict(gm.named_modules())
    branch_side = 0 if len(sides[0]) > len(sides[1]) else 1
    branch_nodes, shortcut_nodes = sides[branch_side], sides[1 - branch_side]
    branch_out, shortcut_out = operands[branch_side], operands[1 - branch_side]
    post_node = next(iter(add.users)) if len(add.users) == 1 else None
    if post_node is not None and not (post_node.op == "call_module" and _is_activation_call(post_node, modules)):
        post_node = None
    unit = Residual(
        _subgraph(gm, branch_nodes, source, branch_out),
        _subgraph(gm, shortcut_nodes, source, shortcut_out) if shortcut_nodes else None,
        post=modules[post_node.target] if post_node is not None else None,
        input_nonnegative=_nonnegative(source, modules),
        **_residual_gate(method))
    last = post_node if post_node is not None else add
    name = _unique_name(gm, ".".join(filter(None, [_owner_prefix(add), "residual"])), taken)
    gm.add_submodule(name, unit)
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, (source,))
    call.meta = dict(last.meta)  # an enclosing unit reads its shape
    last.replace_all_uses_with(call)
    for node in sorted(region | {add} | ({post_node} if post_node is not None else set()),
                       key=order.__getitem__, reverse=True):
        gm.graph.erase_node(node)
    return True


def _convert_residuals(gm: fx.GraphModule, method: str, example: torch.Tensor) -> int:
    ShapeProp(gm).propagate(example)
    taken: set[str] = set()
    count = 0
    # Innermost first: an add whose unit is inside another unit's branch is folded into it already.
    for add in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ADDS
                or n.op == "call_method" and n.target in ("add", "add_")]:
        count += _convert_one_add(gm, add, method, taken)
    return count


# ---- entry point -------------------------------------------------------------------------------

def make_foldable(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    activations: str | None = "folding",
    residuals: str | None = None,
    unsupported_activations: str = "error",
) -> fx.GraphModule:
    """A deep copy of ``model`` with foldable activations and/or residual units (see the module doc).

    ``activations``: ``"folding"`` (Layer Folding activations at every ReLU-family call site) or
    None (leave activations alone). ``residuals``: None, ``"implosion"``, ``"epsilon"`` or ``"fade"``.
    ``unsupported_activations``: ``"error"`` (default) or ``"keep"`` for GELU, SiLU, Sigmoid, ...
    ``example_input`` is one batch the model accepts; it resolves the residual adds' shapes.
    """
    if activations not in (None, "folding"):
        raise ValueError(f"activations must be 'folding' or None, got {activations!r}")
    if residuals not in (None, *RESIDUAL_METHODS):
        raise ValueError(f"residuals must be one of {RESIDUAL_METHODS} or None, got {residuals!r}")
    if unsupported_activations not in ("error", "keep"):
        raise ValueError(f"unsupported_activations must be 'error' or 'keep', got {unsupported_activations!r}")
    gm = _trace(copy.deepcopy(model))
    n_act = _convert_activations(gm, unsupported_activations) if activations == "folding" else 0
    n_res = 0
    if residuals is not None:
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            n_res = _convert_residuals(gm, residuals, example_input)
        gm.train(was_training)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    logger.info("make_foldable: %d activation call sites, %d residual units", n_act, n_res)
    return gm
