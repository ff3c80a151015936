"""KV heads copied before a head-uniform transform (Falcon's new decoder architecture).

Falcon-40B style models broadcast each K/V head of the fused projection to its group of query
heads *before* RoPE, so no chain of layout ops from the core's K reaches a [B, Hkv, S, D]
tensor (what ``kv_expansion`` looks for). What still holds is that the heads of a group read
the same projection elements through value-preserving steps that treat every head alike
(layout ops, constant rescales, RoPE whose cos/sin do not vary over heads): they hold equal
values. The canonical K is then one head of each group, ``k[:, ::group]``, which is the
identity for GQA attention.

Found by index tensors, like the rest of the matcher: the ids of the walk's root elements are
pushed to the canonical operand, and head h must carry the ids of head ``h - h % group``.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from rewriter.ir.graph import val
from rewriter.patterns.graph import is_op
from rewriter.patterns.layout import Operand, Step, apply_node, iota
from rewriter.patterns.projections import InputWalk, rotated_from, walk_to_projection

aten = torch.ops.aten

KIND = "head-copies"


def peel_head_copies(k: Operand, v: Operand, num_heads: int) -> tuple[Operand, Operand, str] | None:
    """(k, v, kind) with one head per group of copies, or None when K and V are not copied
    heads (or not with the same group)."""
    gk, gv = _copy_group(k, num_heads), _copy_group(v, num_heads)
    if gk is None or gk != gv:
        return None
    return _one_per_group(k, num_heads, gk), _one_per_group(v, num_heads, gv), KIND


def _one_per_group(operand: Operand, num_heads: int, group: int) -> Operand:
    one_per_group = Step(aten.slice.Tensor, (1, 0, num_heads, group))
    return Operand(operand.node, (*operand.steps, one_per_group))


def _copy_group(operand: Operand, num_heads: int) -> int | None:
    """The largest group g > 1 such that head h of ``operand`` equals head h - h % g."""
    walk = walk_to_projection(operand.node)
    try:
        indices = _indices_along(walk)
    except Exception:  # a layout op that does not replay on an index tensor
        return None
    target = indices[walk.path[-1]]
    for step in operand.steps:
        target = step.apply(target)
    if target.dim() != 4 or target.shape[1] != num_heads:
        return None
    for group in range(num_heads, 1, -1):
        if num_heads % group or not _copies(target, 1, group):
            continue
        if all(_head_uniform(out, indices[out], group) for out, _, _ in walk.units):
            return group
    return None


def _indices_along(walk: InputWalk) -> dict[Node, torch.Tensor]:
    """Root-element ids at every node of the walk (positional units and rescales pass them)."""
    passthrough = {out for out, _, _ in walk.units} | set(walk.rescales)
    index = iota(walk.path[0])
    out = {walk.path[0]: index}
    for n in walk.path[1:]:
        index = index if n in passthrough else apply_node(n, index)
        out[n] = index
    return out


def _copies(index: torch.Tensor, axis: int, group: int) -> bool:
    """Along ``axis``, every run of ``group`` positions holds the same ids."""
    n = index.shape[axis]
    if n % group:
        return False
    first = index.index_select(axis, torch.arange(0, n, group))
    return torch.equal(first.repeat_interleave(group, dim=axis), index)


def _head_uniform(unit: Node, index: torch.Tensor, group: int) -> bool:
    """The positional unit ending at ``unit`` multiplies by factors (cos, sin) that do not vary
    along any axis on which the copies lie, so copies stay copies."""
    axes = [a for a in range(index.dim()) if index.shape[a] > 1 and _copies(index, a, group)]
    if not axes:
        return False
    factors = _unit_factors(unit)
    if factors is None:
        return False
    for f in factors:
        fv = val(f) if isinstance(f, Node) else None
        if isinstance(f, Node) and not isinstance(fv, torch.Tensor):
            return False
        if fv is None:
            continue  # a Python number
        offset = index.dim() - fv.dim()
        if offset < 0:
            return False
        for a in axes:
            if a >= offset and fv.shape[a - offset] != 1:
                return False
    return True


def _unit_factors(unit: Node) -> list | None:
    """The multiplicands of a RoPE unit ``x * cos + rotate(x) * sin`` other than x and its
    rotation (cos and sin); for partial RoPE, those of the rotated part."""
    if is_op(unit, aten.cat.default):
        rotated = unit.args[0][0]
        return _unit_factors(rotated) if isinstance(rotated, Node) else None
    if not (is_op(unit, aten.add.Tensor) and all(is_op(p, aten.mul.Tensor) for p in unit.args[:2])):
        return None
    a, b = unit.args[0], unit.args[1]
    for first, second in ((a, b), (b, a)):
        for i, x in enumerate(first.args[:2]):
            for j, y in enumerate(second.args[:2]):
                if isinstance(x, Node) and rotated_from(y, x):
                    return [first.args[1 - i], second.args[1 - j]]
    return None
