"""Projections around a core: q/k/v projections (separate, fused, interleaved), positional
transforms between them and the core, and the output projection after the head merge.

Which features of a projection belong to which head is computed, not pattern-matched: an
index tensor over the projection's output is pushed through the layout ops (and through the
positional transform, which keeps every element in its head) to the canonical operand."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch.fx import Node

from rewriter.ir.graph import concrete, val
from rewriter.ir.site import Projection
from rewriter.patterns.graph import is_op, is_parameter, shape
from rewriter.patterns.layout import Operand, apply_node, chain_down, chain_up, iota, is_layout

aten = torch.ops.aten

MUL = (aten.mul.Tensor,)
ADD = (aten.add.Tensor,)
# Ops a rotate-half / rotate-every-two builds from x.
_ROTATION_OPS = {
    aten.neg.default, aten.slice.Tensor, aten.cat.default, aten.stack.default,
    aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.select.int,
    aten.unsqueeze.default, aten.unflatten.int, aten.contiguous.default, aten.clone.default,
    aten.to.dtype, aten._to_copy.default, aten.type_as.default,
}


# --- positional transforms ------------------------------------------------------------------


def positional_unit(node: Node) -> tuple[Node, str] | None:
    """(x, kind) when ``node`` is a positional transform of x that keeps elements in their head:
    RoPE ``x * cos + rotate(x) * sin`` (half or interleaved rotation), or partial RoPE
    ``cat(rope(x[..., :r]), x[..., r:])``."""
    if is_op(node, *ADD) and all(is_op(a, *MUL) for a in node.args[:2]):
        a, b = node.args[0], node.args[1]
        for first, second in ((a, b), (b, a)):
            for x in first.args[:2]:
                if isinstance(x, Node) and any(rotated_from(y, x) for y in second.args[:2]):
                    return x, "rope"
    if is_op(node, aten.cat.default) and len(node.args[0]) == 2:
        rotated, passed = node.args[0]
        inner = positional_unit(rotated) if isinstance(rotated, Node) else None
        if inner and is_op(passed, aten.slice.Tensor):
            # x[..., :r] may be written as a slice or, when r is the whole head, an alias.
            # x[:, :, :, :r] and x[:, :, :, r:] (GPT-J, CodeGen) export each side's full
            # slices as nodes of their own: compare the two sides without them.
            source = _skip_full_slices(passed.args[0])
            if source in {_skip_full_slices(n) for n in chain_up(inner[0])[1:]} and \
                    _same_shape(node, passed.args[0]):
                return passed.args[0], "rope-partial"
    return None


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = val(a), val(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and \
        [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _skip_full_slices(node: Node) -> Node:
    """``node`` without the slices above it that keep every element (``x[:, :]``)."""
    while is_op(node, aten.slice.Tensor) and isinstance(node.args[0], Node) and \
            _same_shape(node, node.args[0]):
        node = node.args[0]
    return node


def rotated_from(y, x: Node, limit: int = 12) -> bool:
    """y is built from x by slicing, negating and concatenating (a rotation of x)."""
    if not isinstance(y, Node):
        return False
    seen_neg = False
    queue, seen = deque([y]), {y}
    while queue and limit > 0:
        n = queue.popleft()
        limit -= 1
        if n is x:
            return seen_neg
        if n.op != "call_function" or n.target not in _ROTATION_OPS:
            continue
        seen_neg |= n.target is aten.neg.default
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return False


def is_scalar_rescale(node: Node) -> bool:
    return is_op(node, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar) and \
        isinstance(node.args[1], (int, float)) and isinstance(node.args[0], Node)


# --- projections ----------------------------------------------------------------------------


def is_projection(node: Node) -> bool:
    if is_op(node, aten.linear.default):
        return is_parameter(node.args[1])
    if is_op(node, aten.addmm.default):
        return is_parameter(node.args[2])
    if is_op(node, aten.matmul.default, aten.mm.default):
        return is_parameter(node.args[1]) and len(shape(node.args[1])) == 2
    return False


def projection_input(node: Node) -> Node:
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def _make_projection(node: Node, features: tuple[tuple[int, ...], ...],
                     output: bool = False) -> Projection:
    """``output``: the projection reads the heads (o_proj), so its *input* features count."""
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else None
        weight, kind, bias = node.args[1], "linear", bias
    elif node.target is aten.addmm.default:
        weight, kind, bias = node.args[2], "conv1d", node.args[0]
    else:
        weight, kind, bias = node.args[1], "matmul", None
    w_shape = shape(weight)
    out_dim = 0 if kind == "linear" else 1
    total = w_shape[1 - out_dim] if output else w_shape[out_dim]
    return Projection(node.name, weight.target, bias.target if is_parameter(bias) else None,
                      kind, features, int(total))


@dataclass
class InputWalk:
    """The way back from a canonical operand to the projection that produced it, through
    layout ops, constant rescales (pre-scaled q) and positional transforms (RoPE)."""

    projection: Node | None  # None: the walk stopped at ``stopped``
    path: list[Node]  # projection (or ``stopped``) ... operand
    rescales: list[Node]
    units: list[tuple[Node, Node, str]]  # positional (output, input, kind), projection side first
    stopped: Node | None = None

    @property
    def positional(self) -> str:
        """The positional kinds met, operand side first ("none" when none)."""
        return "+".join(kind for _, _, kind in reversed(self.units)) or "none"

    def index(self) -> torch.Tensor:
        """Ids of projection-output elements as they arrive at the operand (value-preserving
        steps, the rescales and positional transforms, pass ids through unchanged)."""
        passthrough = {out for out, _, _ in self.units} | set(self.rescales)
        index = iota(self.path[0])
        for n in self.path[1:]:
            index = index if n in passthrough else apply_node(n, index)
        return index


def walk_to_projection(operand: Node) -> InputWalk:
    """Walk back from ``operand`` to its projection (see InputWalk)."""
    path, rescales, units = [operand], [], []
    node = operand
    while not is_projection(node):
        if is_layout(node):
            node = node.args[0]
        elif is_scalar_rescale(node):
            rescales.append(node)
            node = node.args[0]
        else:
            unit = positional_unit(node)
            if unit is None:
                return InputWalk(None, path[::-1], rescales, units[::-1], stopped=node)
            units.append((node, unit[0], unit[1]))
            node = unit[0]
        path.append(node)
    return InputWalk(node, path[::-1], rescales, units[::-1])


def output_projection(node: Node) -> tuple[Node, list[Node]] | None:
    """The projection that reads ``node`` through layout ops only (a head merge), and that
    chain (``node`` first); None when something else reads it."""
    down = chain_down(node)
    users = list(down[-1].users)
    if len(users) != 1 or not is_projection(users[0]) or projection_input(users[0]) is not down[-1]:
        return None
    return users[0], down


@dataclass
class ProjectionTrace:
    projection: Projection | None
    positional: str
    source: Node | None  # the projection's input (the hidden states it reads)
    reason: str = ""


def trace_input_projection(operand: Operand) -> ProjectionTrace:
    """Walk from a canonical q/k/v operand back to the projection that produced it."""
    walk = walk_to_projection(operand.node)
    positional, path = walk.positional, walk.path
    if walk.projection is None:
        return ProjectionTrace(None, positional, None,
                               f"{walk.stopped.name} is neither a layout op nor a projection")
    index = walk.index()
    for step in operand.steps:
        index = step.apply(index)
    features = _features_by_head(index, concrete(shape(path[0])))
    if features is None:
        return ProjectionTrace(None, positional, projection_input(path[0]),
                               "heads do not map to fixed projection features")
    return ProjectionTrace(_make_projection(path[0], features), positional,
                           projection_input(path[0]))


def _features_by_head(index: torch.Tensor, out_dims) -> tuple[tuple[int, ...], ...] | None:
    """index: [B, H, S, D] ids of projection-output elements -> per head, its feature ids."""
    if index.dim() != 4:
        return None
    feature = index % out_dims[-1]
    first = feature[0, :, 0, :]
    if not torch.equal(feature, first[None, :, None, :].expand_as(feature)):
        return None
    return tuple(tuple(int(f) for f in row) for row in first)


def trace_output_projection(output: Node, canonical_dims: tuple, out_steps) -> Projection | None:
    """From the core's output through the head merge to the output projection.

    ``canonical_dims`` is the concrete [B, H, Sq, Dv] of the core's result and ``out_steps`` the
    layout steps that turn it into ``output``'s layout."""
    found = output_projection(output)
    if found is None:
        return None
    projection, down = found
    b, h, s, d = canonical_dims
    index = torch.arange(b * h * s * d).view(b, h, s, d)
    for step in out_steps:
        index = step.apply(index)
    for n in down[1:]:
        index = apply_node(n, index)
    if index.shape[-1] != h * d:
        return None
    rows = index.reshape(-1, h * d)
    head, chan = (rows // (s * d)) % h, rows % d
    if not (_rows_equal(head) and _rows_equal(chan)):
        return None  # some token's features map to different heads than another's
    features = []
    for hh in range(h):
        cols = (head[0] == hh).nonzero().flatten()
        order = chan[0, cols].argsort()
        features.append(tuple(int(c) for c in cols[order]))
    return _make_projection(projection, tuple(features), output=True)


def _rows_equal(t: torch.Tensor) -> bool:
    return torch.equal(t, t[:1].expand_as(t))
