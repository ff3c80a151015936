"""Layout chains and index propagation.

A *layout op* moves or duplicates elements without computing new values (view, transpose,
split, expand, casts, ...). Patterns never enumerate the layout ops a model happens to use:
they walk a chain of them and then ask what the chain *does*, by pushing a tensor of indices
(an iota over the chain's root) through the same ops with concrete sizes. Comparing index
tensors answers questions such as "is this [B*H, S, D] operand a flattening of [B, H, S, D]
with heads inner?", "is this K the repeat_kv expansion of a [B, Hkv, S, D] tensor?" or "which
output features of the fused QKV projection feed query head 3?".
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from rewriter.ir.graph import concrete, val
from rewriter.patterns.graph import MatchFailure, data_users, shape

aten = torch.ops.aten

# Ops whose output elements are copies of input elements (first tensor argument = data).
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.t.default, aten.movedim.int,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.expand.default, aten.broadcast_to.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.select.int, aten.slice.Tensor, aten.narrow.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.repeat_interleave.self_int, aten.repeat.default,
    operator.getitem,
}
# Value casts: the identity for index propagation (they never reorder elements).
CAST_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.dropout.default, aten.lift_fresh_copy.default,
}


def is_layout(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in CAST_OPS:
        return node.target is not aten.dropout.default or not _dropout_active(node)
    return node.target in LAYOUT_OPS


def _dropout_active(node: Node) -> bool:
    return bool(node.args[2]) and float(node.args[1]) > 0 if len(node.args) > 2 else False


def chain_up(node: Node, stop: Callable[[Node], bool] | None = None) -> list[Node]:
    """[node, parent, grandparent, ...] following the data input of layout ops.

    The last element is the root: the first node that is not a layout op (or where ``stop``
    says to stop)."""
    out = [node]
    while is_layout(out[-1]) and not (stop and stop(out[-1])):
        out.append(out[-1].args[0])
    return out


def chain_down(node: Node) -> list[Node]:
    """[node, child, ...] following single data users that are layout ops."""
    out = [node]
    while True:
        users = data_users(out[-1])
        if len(users) != 1 or not is_layout(users[0]) or users[0].args[0] is not out[-1]:
            return out
        out.append(users[0])


def apply_node(node: Node, data: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Re-run a layout node on ``data`` (in place of its first argument) with concrete sizes."""
    if node.target in CAST_OPS:
        return data
    if node.target is operator.getitem:
        return data[node.args[1]]
    rest = map_arg(node.args[1:], concrete)
    kwargs = {k: concrete(v) for k, v in node.kwargs.items() if k != "memory_format"}
    return node.target(data, *rest, **kwargs)


def propagate(path: Sequence[Node], data: torch.Tensor) -> torch.Tensor:
    """Push ``data`` (standing for path[0]'s value) through path[1:], in order."""
    out: torch.Tensor | tuple = data
    for node in path[1:]:
        out = apply_node(node, out)
    assert isinstance(out, torch.Tensor)
    return out


def iota(node: Node) -> torch.Tensor:
    """Unique element ids laid out in the node's (concrete) shape."""
    dims = concrete(shape(node))
    n = 1
    for d in dims:
        n *= d
    return torch.arange(n, dtype=torch.int64).view(dims)


# --- Steps: small layout edits that canonicalization both evaluates and emits ---------------


@dataclass(frozen=True)
class Step:
    """One layout op applied to an operand to bring it to [B, H, S, D]."""

    target: object
    args: tuple

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return self.target(t, *self.args)


def transpose_last() -> Step:
    return Step(aten.transpose.int, (-2, -1))


def unflatten_heads(num_heads: int) -> Step:
    return Step(aten.unflatten.int, (0, [-1, num_heads]))


def permute(perm: Sequence[int]) -> Step:
    return Step(aten.permute.default, (list(perm),))


@dataclass
class Operand:
    """A tensor in the graph plus the steps that make it canonical ([B, H, S, D])."""

    node: Node
    steps: tuple[Step, ...] = ()

    def canonical_index(self, path: Sequence[Node]) -> torch.Tensor:
        """Index tensor of the canonical operand, given a layout path from a root to ``node``."""
        t = propagate(path, iota(path[0]))
        for step in self.steps:
            t = step.apply(t)
        return t

    def canonical_shape(self) -> tuple:
        v = val(self.node)
        for step in self.steps:
            v = step.apply(v)
        return tuple(v.shape)


def simplify_transpose(operand: Operand) -> Operand:
    """A trailing transpose(-2, -1) on a node that is itself such a transpose cancels out."""
    if operand.steps[:1] == (transpose_last(),):
        n = operand.node
        if n.target is aten.transpose.int and _is_last_two(n.args[1:], len(shape(n))):
            return Operand(n.args[0], operand.steps[1:])
        if n.target is aten.permute.default:
            perm = list(n.args[1])
            r = len(perm)
            swapped = list(range(r - 2)) + [r - 1, r - 2]
            if [p % r for p in perm] == swapped:
                return Operand(n.args[0], operand.steps[1:])
    return operand


def _is_last_two(dims, rank: int) -> bool:
    return sorted(d % rank for d in dims) == [rank - 2, rank - 1]


def heads_of_flat_batch(node: Node) -> int:
    """H for an operand laid out [B*H, S, D] (heads inner).

    With a dynamic batch, dim 0 is ``H * s_batch`` symbolically and H is its coefficient. With
    a static batch, the elements of each row are traced to the root of the layout chain: rows
    that share every root coordinate except the feature one belong to the same token."""
    n0 = val(node).shape[0]
    if isinstance(n0, torch.SymInt) and not n0.node.expr.is_number:
        coeff, rest = n0.node.expr.as_coeff_Mul()
        if rest.is_Symbol and int(coeff) == coeff:
            return int(coeff)
        raise MatchFailure(f"cannot split batch*heads size {n0} of {node.name}", node)
    path = list(reversed(chain_up(node)))
    root_dims = concrete(shape(path[0]))
    index = propagate(path, iota(path[0]))  # [N, S, D]
    coords = torch.stack(torch.unravel_index(index[:, 0, :], root_dims), dim=-1)  # [N, D, R]
    along_d = (coords != coords[:, :1]).any(dim=(0, 1))  # the root's feature dim(s)
    rows = coords[:, 0, :]  # [N, R]
    changes = (rows[1:] != rows[:-1]).sum(dim=0)  # how often each root dim changes across rows
    candidates = [r for r in range(rows.shape[1]) if not along_d[r] and changes[r] > 0]
    if not candidates:
        return rows.shape[0]  # a single sequence: every row is a head
    batch_dim = min(candidates, key=lambda r: int(changes[r]))  # the slowest-changing one
    same = rows[:, batch_dim] == rows[0, batch_dim]
    heads = int(same.sum())
    expected = torch.arange(rows.shape[0]) // heads
    _, batch_ids = torch.unique_consecutive(rows[:, batch_dim], return_inverse=True)
    if rows.shape[0] % heads or not torch.equal(batch_ids, expected):
        raise MatchFailure(f"cannot find the heads in the [B*H, S, D] operand {node.name}", node)
    return heads
