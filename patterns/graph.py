"""Small helpers over torch.fx nodes: values, shapes, constants, argument access."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten


class MatchFailure(Exception):
    """Why a candidate is not attention (or not one we can rewrite). Carries the node blamed."""

    def __init__(self, reason: str, node: Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def val(node: Any) -> Any:
    """The traced value (FakeTensor, SymInt, ...) of a node; plain Python values pass through."""
    return node.meta.get("val") if isinstance(node, Node) else node


def shape(node: Node) -> tuple:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise MatchFailure(f"{node.name} has no tensor value", node)
    return tuple(v.shape)


def concrete(x: Any) -> Any:
    """A concrete Python value for an argument: SymInts become their example-input hint."""
    if isinstance(x, Node):
        x = val(x)
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint if hint is not None else x.node.shape_env.size_hint(x.node.expr))
    if isinstance(x, torch.SymFloat):
        return float(x.node.hint)
    if isinstance(x, (list, tuple)):
        return type(x)(concrete(e) for e in x)
    return x


def static_int(x: Any) -> int | None:
    """An int that is the same for every input, or None when it varies (a symbolic size)."""
    if isinstance(x, Node):
        x = val(x)
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_number else None
    return None


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument access for aten call_function nodes."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_parameter(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def scalar_constant(x: Any, gm: GraphModule | None = None) -> float | None:
    """The value of a number, or of a 0-d/1-element constant tensor node; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr" and gm is not None:
        t = fetch_attr(gm, x.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.item())
        return None
    if is_op(x, aten.scalar_tensor.default, aten.full.default):
        fill = x.args[0] if x.target == aten.scalar_tensor.default else x.args[1]
        return float(fill) if isinstance(fill, (int, float)) else None
    if is_op(x, aten.full_like.default, aten.new_full.default):
        fill = x.args[1] if x.target == aten.full_like.default else x.args[2]
        return float(fill) if isinstance(fill, (int, float)) else None
    if is_op(x, aten.lift_fresh_copy.default, aten.detach.default, aten.clone.default,
             aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.expand.default):
        return scalar_constant(x.args[0], gm)
    return None


def fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj



# Ops that read only a tensor's shape/dtype, never its values.
SHAPE_ONLY = {
    aten._assert_tensor_metadata.default, aten.sym_size.int, aten.full_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
    aten.new_full.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default,
}


def data_users(node: Node) -> list[Node]:
    """Users that consume the value (shape-only reads such as full_like do not count)."""
    return [u for u in node.users if u.target not in SHAPE_ONLY]


def getitem_of(node: Node) -> tuple[Node, int] | None:
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return None


def depends_on_input(node: Node, cache: dict[Node, bool]) -> bool:
    """True if the node's value depends on a graph input (not only on parameters/constants)."""
    stack = [node]
    seen: list[Node] = []
    result = False
    while stack:
        n = stack.pop()
        if n in cache:
            if cache[n]:
                result = True
                break
            continue
        if n.op == "placeholder":
            result = True
            break
        seen.append(n)
        stack.extend(n.all_input_nodes)
    if not result:
        for n in seen:
            cache[n] = False
    return result


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def copy_graph(gm: GraphModule) -> Graph:
    """A copy of gm's graph (nodes new, meta copied shallowly); cheap, no code generation."""
    graph = Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    if out is not None:
        value, output_node = out
        new_output = graph.output(value, type_expr=getattr(output_node, "type", None))
        new_output.meta = dict(output_node.meta)
    return graph


def graph_module_from(gm: GraphModule, graph: Graph) -> GraphModule:
    """A GraphModule running ``graph`` over gm's parameters (shared, not copied)."""
    new = GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec", "range_constraints"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    return new


def tensor_aliases(gm: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter/buffer, grouped by tensor identity (tied weights, such as
    an LM head sharing the input embedding, have several)."""
    names: dict[int, list[str]] = {}
    for name, tensor in (*gm.named_parameters(remove_duplicate=False),
                         *gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    return names


def graph_module_over(gm: GraphModule, graph: Graph,
                      convert: Callable[[Any], Any] | None = None) -> GraphModule:
    """A GraphModule running ``graph`` over the attributes of ``gm`` it reads, and nothing
    else (tensors shared, or mapped through ``convert``). A tied tensor keeps all its names,
    read or not, so a checkpoint written from the result still has every tied weight."""
    aliases = tensor_aliases(gm)
    root: dict[str, Any] = {}
    extra: dict[str, Any] = {}  # tied names the graph does not read
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target in root:
            continue
        obj = fetch_attr(gm, node.target)
        root[node.target] = new = convert(obj) if convert is not None else obj
        if node.op == "get_attr":
            extra.update({name: new for name in aliases.get(id(obj), ()) if name != node.target})
    module = GraphModule(root, graph, class_name=type(gm).__name__)
    for name, tensor in extra.items():
        if name not in root:
            set_attr(module, name, tensor)
    for attr in ("_in_spec", "_out_spec", "range_constraints"):
        if hasattr(gm, attr):
            setattr(module, attr, getattr(gm, attr))
    return module


def set_attr(module: torch.nn.Module, target: str, value: Any) -> None:
    """``module.<target> = value``, creating empty submodules on the way."""
    *path, name = target.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        module.register_buffer(name, value)  # as GraphModule does with a dict root
    else:
        setattr(module, name, value)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule with its own graph, sharing parameters."""
    return graph_module_from(gm, copy_graph(gm))
