"""Logits for the last position only: the final projection (the LM head) of a causal LM runs on
the last row of its input instead of all S rows, as Hugging Face's ``logits_to_keep=1``.

Generation reads only ``logits[:, -1]``; the LM head is [S, E] x [E, V], about a fifth of a
135M model's prefill FLOPs (V = 49152 against E = 576), so a prefill that keeps one row saves
that much. The graph must say the logits are position-wise after that projection, which is
checked by walking back from the output:

    h [B, S, E] -> linear(h, W[, b]) [B, S, V] -> position-wise ops -> logits [B, S, V]

where a position-wise op is elementwise (Gemma's soft-capping: div, tanh, mul; casts) with
every other operand a constant that does not vary along S, or a slice that keeps all of S.
``slice(h, 1, -1)`` is inserted before the projection; what follows then has S = 1.

Shape glossary: B batch, S positions, E model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from rewriter.errors import RewriterError
from rewriter.ir.graph import ancestors

__all__ = ["LastPositionError", "keep_last_position"]

aten = torch.ops.aten
_END = 2**63 - 1  # slice's "to the end"
_PROJECTIONS = frozenset({aten.linear.default, aten.matmul.default})
_ELEMENTWISE = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.tanh.default, aten.neg.default, aten.sigmoid.default, aten.to.dtype,
    aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
})
_SEQ_AXIS = 1  # logits are [B, S, V]
_SLICE_DEFAULTS = (0, None, None, 1)  # aten.slice.Tensor's dim, start, end, step


class LastPositionError(RewriterError):
    """The logits are not a position-wise function of one final projection."""


def keep_last_position(module: GraphModule, output: int = 0) -> Node:
    """Rewrite ``module`` in place so that its output number ``output`` (logits [B, S, V]) is
    computed for the last position only ([B, 1, V]); returns the inserted slice. Raises
    LastPositionError (nothing changed) when the walk back from the output does not reach a
    projection through position-wise ops alone."""
    graph = module.graph
    out = next(n for n in graph.nodes if n.op == "output")
    node = _flat_outputs(out)[output]
    while True:
        if not isinstance(node, Node) or node.op != "call_function":
            raise LastPositionError(f"output {output} is not computed by the graph's ops")
        _read_once(node)
        if _is_projection(node):
            break
        node = _position_wise_input(node)
    h = node.args[0]
    with graph.inserting_before(node):
        last = graph.call_function(aten.slice.Tensor, (h, _SEQ_AXIS, -1, _END))
    node.replace_input_with(h, last)
    graph.lint()
    module.recompile()
    return last


def _flat_outputs(out: Node) -> list:
    value = out.args[0]
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _is_projection(node: Node) -> bool:
    """linear(h, W[, b]) or matmul(h, W), W (and b) constant, h [B, S, E] (a flattened
    [B * S, E] would not keep its positions on axis 1)."""
    if node.target not in _PROJECTIONS or not isinstance(node.args[0], Node):
        return False
    return _ndim(node.args[0]) == 3 and _ndim(node.args[1]) == 2 \
        and all(_constant(w) for w in node.args[1:])


def _position_wise_input(node: Node) -> Node:
    """The one operand of ``node`` that carries positions, when ``node`` maps each position on
    its own; else LastPositionError naming the op."""
    if node.target == aten.slice.Tensor:
        x, *given = node.args
        dim, start, end, step = (*given, *_SLICE_DEFAULTS[len(given):])
        whole = start in (None, 0) and (end is None or end >= _END) and step == 1
        if whole or (dim + (_ndim(x) or 0) if dim < 0 else dim) != _SEQ_AXIS:
            return x
        raise LastPositionError(f"{node.name} slices the position axis before the logits")
    if node.target not in _ELEMENTWISE:
        raise LastPositionError(f"{node.name} ({_op(node)}) between the last projection and "
                                "the logits is not known to act on each position alone")
    varying = [a for a in node.args if isinstance(a, Node) and not _constant(a)]
    if len(varying) != 1:
        raise LastPositionError(f"{node.name} ({_op(node)}) combines the logits with another "
                                "input-dependent tensor")
    x = varying[0]
    for other in node.args:
        if isinstance(other, Node) and other is not x and not _broadcasts_over_positions(other, x):
            raise LastPositionError(f"{node.name} ({_op(node)}) has an operand that varies "
                                    "along the position axis")
    return x


def _read_once(node: Node) -> None:
    """Keeping one position changes ``node``: nothing but the logits may read it."""
    if len(node.users) != 1:
        raise LastPositionError(f"{node.name} ({_op(node)}) is read elsewhere than the logits: "
                                "keeping one position would change what else reads it")


def _constant(node) -> bool:
    """A parameter, buffer or Python value, or computed from those alone (no graph input)."""
    if not isinstance(node, Node):
        return True
    return node.op == "get_attr" or (
        node.op == "call_function"
        and not any(a.op == "placeholder" for a in ancestors(node)))


def _broadcasts_over_positions(other: Node, x: Node) -> bool:
    """``other`` broadcast against ``x`` has size 1 (or no axis) at x's position axis."""
    ndim, shape = _ndim(x), _shape(other)
    if ndim is None or shape is None:
        return False
    aligned = _SEQ_AXIS - (ndim - len(shape))  # broadcasting aligns trailing axes
    return aligned < 0 or shape[aligned] == 1


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _ndim(node) -> int | None:
    shape = _shape(node)
    return None if shape is None else len(shape)


def _op(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target))
