"""Graph utilities every layer shares: node values, copying graphs and the modules that run
them (tied weights kept), emitting new nodes with their traced values, dead-code cleanup, and
the scan for canonical attention nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _side_effectful_functions, map_arg

import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)

ATTENTION = torch.ops.rewriter.attention.default


def val(node: Any) -> Any:
    """The traced value (FakeTensor, SymInt, ...) of a node; plain Python values pass through."""
    return node.meta.get("val") if isinstance(node, Node) else node


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


def fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def tensor_aliases(gm: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter/buffer, grouped by tensor identity (tied weights, such as
    an LM head sharing the input embedding, have several)."""
    names: dict[int, list[str]] = {}
    for name, tensor in (*gm.named_parameters(remove_duplicate=False),
                         *gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    return names


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


class Emitter:
    """Creates call_function nodes with their fake values, before a given node."""

    def __init__(self, gm: GraphModule):
        placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode([v for v in placeholders if v is not None])
        self.graph = gm.graph
        self.meta: dict = {}

    def call(self, target, args, kwargs=None) -> Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        node.meta.update(self.meta)
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*map_arg(args, val), **map_arg(kwargs, val))
        return node

    def fake(self, tensor: torch.Tensor):
        """The traced value of a real tensor (a parameter about to be read by get_attr)."""
        return self.fake_mode.from_tensor(tensor) if self.fake_mode is not None else tensor


def has_side_effects(node: Node) -> bool:
    """Kept even when unused: graph inputs/outputs, the export's guard module, and ops that
    mutate or print. Random ops like dropout count as pure here: FX keeps them by default,
    which would leave the replaced attention computing next to its canonical node."""
    if node.op in ("placeholder", "output", "call_module"):
        return True
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable or node.target in _side_effectful_functions
    return node.is_impure()


def cleanup(gm: GraphModule, recompile: bool = True) -> None:
    """Drop dead nodes (keeping side-effecting ones, like the export's input guards), lint, and
    regenerate code."""
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
    gm.graph.lint()
    if recompile:
        gm.recompile()


def ancestors(node: Node) -> set[Node]:
    """``node`` and every node it is computed from."""
    return _closure(node, lambda n: n.all_input_nodes)


def descendants(node: Node) -> set[Node]:
    """``node`` and every node computed from it."""
    return _closure(node, lambda n: n.users)


def _closure(node: Node, step: Callable[[Node], Any]) -> set[Node]:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(step(n))
    return out


def canonical_nodes(graph: Graph | GraphModule) -> dict[str, Node]:
    """The canonical ``rewriter::attention`` nodes by name, in graph order."""
    graph = graph.graph if isinstance(graph, GraphModule) else graph
    return {n.name: n for n in graph.nodes if n.op == "call_function" and n.target is ATTENTION}


def remove_unused_attributes(gm: GraphModule) -> int:
    """Delete parameters/buffers no get_attr reads any more (e.g. a removed k_proj); a tied
    name stays while the tensor is read under another. Returns the number of elements freed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = dict((*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)))
    freed = 0
    for names in tensor_aliases(gm).values():
        if used.intersection(names):
            continue
        freed += tensors[names[0]].numel()
        for name in names:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    return freed
