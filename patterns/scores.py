"""The score chain: everything between ``q @ k^T`` and the softmax, normalized.

Models place the scale before or after the product, divide or multiply, add masks, fill them,
cap logits with tanh, and cast to fp32 in between. Walking back from the softmax, each op is
read as one of a few *score ops*; folding them forward gives the canonical form::

    s = product * scale ;  s = softcap * tanh(s / softcap) ;  s = s + sum(mask terms)

or a MatchFailure saying which op does not fit that form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from rewriter.ir.graph import val
from rewriter.patterns.graph import MatchFailure, data_users, is_op, scalar_constant, shape

aten = torch.ops.aten

CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
         aten.contiguous.default, aten.clone.default, aten.alias.default)
PRODUCTS = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default)
MUL = (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor)  # mul_: Falcon's `scores *= c`
DIV = (aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor)  # div_: Falcon's `scores /= c`
ADD = (aten.add.Tensor,)
# A fill value at least this negative drives a softmax weight to exactly 0, like -inf.
MASKING_VALUE = -1e30
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class MaskTerm:
    """An additive contribution to the scores.

    ``kind`` "tensor": ``node * multiplier``; "fill": ``value * multiplier`` where ``cond`` is
    True (``keep=False``) or False (``keep=True``), else 0."""

    kind: str
    node: Node
    value: float = 0.0
    keep: bool = False
    multiplier: float = 1.0
    rank: int = 0  # rank of the scores it is added to (0: the product's)


@dataclass
class ScoreForm:
    product: Node
    scale: float = 1.0
    softcap: float = 0.0
    terms: list[MaskTerm] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)  # the chain, product excluded
    split_heads: int | None = None  # [B*H, Sq, Sk] scores viewed as [B, H, Sq, Sk] (BLOOM)

    def apply_scale(self, c: float, node: Node) -> None:
        if self.softcap:
            raise MatchFailure("scores are rescaled after the tanh softcap", node)
        self.scale *= c
        self.terms = [replace(t, multiplier=t.multiplier * c) for t in self.terms]

    def add_term(self, term: MaskTerm) -> None:
        self.terms.append(term)


def _single_user(node: Node) -> bool:
    return len(data_users(node)) == 1


def _softcap_unit(node: Node, gm: GraphModule) -> tuple[Node, float] | None:
    """``cap * tanh(x / cap)`` ending at ``node`` -> (x, cap)."""
    if not is_op(node, *MUL):
        return None
    for t, c in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        cap = scalar_constant(c, gm)
        if cap is None or not is_op(t, aten.tanh.default) or not _single_user(t):
            continue
        inner = t.args[0]
        if is_op(inner, *DIV) and scalar_constant(inner.args[1], gm) == cap:
            return inner.args[0], cap
        if is_op(inner, *MUL):
            k = scalar_constant(inner.args[1], gm)
            if k is not None and math.isclose(k * cap, 1.0, rel_tol=1e-6):
                return inner.args[0], cap
    return None


def walk_scores(x: Node, gm: GraphModule) -> ScoreForm:
    """Walk from the softmax input back to the q @ k^T product and fold the ops between."""
    ops: list[tuple[str, Node, object]] = []  # in reverse (softmax-first) order
    chain: list[Node] = []
    node = x
    while True:
        if not isinstance(node, Node):
            raise MatchFailure("softmax input is not a tensor computed in the graph")
        if node is not x and not _single_user(node):
            raise MatchFailure(f"scores {node.name} are also used outside the attention", node)
        if node.op == "call_function" and node.target in PRODUCTS:
            break
        chain.append(node)
        if node.op != "call_function":
            raise MatchFailure(f"scores come from {node.op} {node.name}, not a product", node)
        t = node.target
        if t in CASTS:
            node = node.args[0]
            continue
        if t in VIEWS and same_shape(node):
            node = node.args[0]
            continue
        if t in VIEWS:
            heads = split_heads_view(node)
            if heads is None:
                raise MatchFailure(f"{node.name} reshapes the scores other than [B*H, Sq, Sk] "
                                   "-> [B, H, Sq, Sk]", node)
            ops.append(("split", node, heads))
            node = node.args[0]
            continue
        cap = _softcap_unit(node, gm)
        if cap is not None:
            ops.append(("softcap", node, cap[1]))
            node = cap[0]
            continue
        if t in MUL or t in DIV:
            a, b = node.args[0], node.args[1]
            c = scalar_constant(b, gm)
            if c is None and t in MUL:
                a, b = b, a
                c = scalar_constant(b, gm)
            if c is None:
                raise MatchFailure(f"{node.name} multiplies the scores by a tensor", node)
            ops.append(("scale", node, c if t in MUL else 1.0 / c))
            node = a
            continue
        if t in ADD and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args[0], node.args[1]
            # The scores side is the one that leads back to a product; the other is the mask.
            side = _score_side(a, b)
            if side is None:
                raise MatchFailure(f"{node.name} adds two things neither of which is scores", node)
            scores, mask = side
            if isinstance(mask, Node):
                ops.append(("term", node, MaskTerm("tensor", mask, rank=_rank(node))))
            else:
                ops.append(("term", node, None))  # adding a constant: softmax-invariant
            node = scores
            continue
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = scalar_constant(node.args[2], gm)
            _check_masking(fill, node)
            ops.append(("term", node, MaskTerm("fill", node.args[1], fill, rank=_rank(node))))
            node = node.args[0]
            continue
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cond, a, b = node.args
            fill_b = scalar_constant(b, gm)
            fill_a = scalar_constant(a, gm)
            if fill_b is not None and isinstance(a, Node) and fill_a is None:
                _check_masking(fill_b, node)
                ops.append(("term", node, MaskTerm("fill", cond, fill_b, keep=True,
                                                   rank=_rank(node))))
                node = a
            elif fill_a is not None and isinstance(b, Node):
                _check_masking(fill_a, node)
                ops.append(("term", node, MaskTerm("fill", cond, fill_a, keep=False,
                                                   rank=_rank(node))))
                node = b
            else:
                raise MatchFailure(f"{node.name} selects between two computed tensors", node)
            continue
        raise MatchFailure(f"the scores trace back to {node.name} ({_op_name(node)}), which is "
                           "not a product of two activations (q @ k^T) nor a scale, mask or "
                           "cast of one: not attention", node)

    form = ScoreForm(product=node, nodes=chain)
    for kind, where, payload in reversed(ops):
        if kind == "split":
            if form.split_heads is not None:
                raise MatchFailure("the scores are reshaped twice", where)
            form.split_heads = int(payload)
        elif kind == "scale":
            form.apply_scale(float(payload), where)
        elif kind == "softcap":
            if form.terms:
                raise MatchFailure("a mask is added before the tanh softcap", where)
            if form.softcap:
                raise MatchFailure("two softcaps on one score", where)
            # cap * tanh(scale*qk / cap): the canonical softcap of the scaled product.
            form.softcap = float(payload)
        elif payload is not None:
            form.add_term(payload)
    return form


def split_heads_view(node: Node) -> int | None:
    """H for a view of [B*H, Sq, Sk] as [B, H, Sq, Sk] (static H), else None."""
    try:
        before, after = shape(node.args[0]), shape(node)
    except MatchFailure:
        return None
    if len(before) != 3 or len(after) != 4 or not isinstance(after[1], int):
        return None
    if str(before[1]) != str(after[2]) or str(before[2]) != str(after[3]):
        return None
    return after[1]


def merge_heads_view(node: Node) -> bool:
    """A view of [B, H, Sq, Sk] probabilities as [B*H, Sq, Sk]."""
    try:
        before, after = shape(node.args[0]), shape(node)
    except MatchFailure:
        return False
    return len(before) == 4 and len(after) == 3 and str(before[2]) == str(after[1]) \
        and str(before[3]) == str(after[2])


def same_shape(node: Node) -> bool:
    """A view that changes nothing (Falcon views [B, H, Sq, Sk] scores as themselves)."""
    try:
        return [str(d) for d in shape(node.args[0])] == [str(d) for d in shape(node)]
    except MatchFailure:
        return False


def _rank(node: Node) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _check_masking(fill: float | None, node: Node) -> None:
    if fill is None or not (fill <= MASKING_VALUE):
        raise MatchFailure(
            f"{node.name} fills scores with {fill!r}, which is not a masking value", node)


def _score_side(a, b):
    """(scores, mask) for an add; the scores side leads back to a product through the chain."""
    for s, m in ((a, b), (b, a)):
        if isinstance(s, Node) and _leads_to_product(s):
            return s, m
    return None


def _leads_to_product(node: Node, depth: int = 12) -> bool:
    while depth > 0 and isinstance(node, Node) and node.op == "call_function":
        if node.target in PRODUCTS:
            return True
        if node.target in CASTS or node.target in MUL or node.target in DIV \
                or node.target in VIEWS:
            node = node.args[0] if isinstance(node.args[0], Node) else node.args[1]
        elif node.target in ADD or node.target in (aten.masked_fill.Scalar,
                                                   aten.masked_fill.Tensor):
            return any(_leads_to_product(a, depth - 1) for a in node.args[:2])
        elif node.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            return any(_leads_to_product(a, depth - 1) for a in node.args[1:3])
        elif node.target is aten.tanh.default:
            node = node.args[0]
        else:
            return False
        depth -= 1
    return False


def _op_name(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def dtype_of(node: Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None
