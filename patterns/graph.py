"""Helpers for matching over torch.fx nodes: why a match failed, shapes, constants, argument
access, data users (generic node and graph utilities are in rewriter.ir.graph)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from rewriter.ir.graph import fetch_attr, val

aten = torch.ops.aten


class MatchFailure(Exception):
    """Why a candidate is not attention (or not one we can rewrite). Carries the node blamed."""

    def __init__(self, reason: str, node: Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def shape(node: Node) -> tuple:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise MatchFailure(f"{node.name} has no tensor value", node)
    return tuple(v.shape)


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


