"""ALiBi: an additive score bias ``slopes[h] * key_position`` read as structure.

BLOOM, MPT, Falcon (``alibi=True``) and hand-written cores add a linear position bias to the
scores (via ``baddbmm``'s input, ``+``, or a mask argument). The canonical op carries it as its
``alibi`` attribute, one slope per query head, with the bias ``alibi[h] * kv_idx``; a per-row
constant (BLOOM's and MPT's ``-(q_idx - kv_idx)`` forms differ from it by one) does not change a
softmax row, so every form is the same attention.

A bias term is taken as ALiBi only with a proof, in two parts:

1. Structure: the bias subgraph reads no activation. It may read graph inputs only through their
   shapes (MPT's slice of a [H, 1, max_len] table, a hand-written ``arange(S)``) or, for a 2-D
   padding mask, through a ``cumsum`` over its last axis (BLOOM: positions counted over the
   tokens the mask keeps). Positions from a cumsum equal ``kv_idx`` on a row without padding
   and ``kv_idx - pad`` (a per-row constant) with left padding; padded keys are masked anyway.
   (A mask with holes *inside* a row would give other positions: HF left-pads, so that form
   is not supported.)
2. Value: evaluated on the captured example (a padding mask read through cumsum replaced by
   all-ones), broadcast to [B, H, Sq, Sk], the bias is finite and exactly
   ``c[b, h, i] + slope[h] * j``, with one slope per head over every batch row and query,
   checked at Sk >= 3 keys.

Anything else stays an opaque additive mask (exact, just not a variant-aware attribute); the
reason is kept as a site note, except for plain masks (a bias holding -inf, or reading the values
of an integer/bool input such as a padding mask), which are not position biases to begin with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from rewriter.patterns.graph import MatchFailure, is_op, scalar_constant
from rewriter.patterns.scores import MASKING_VALUE, MaskTerm
from rewriter.patterns.static_values import NotProven, evaluate, read_structure

aten = torch.ops.aten

MIN_KEYS = 3  # two points are always on a line


class NotAlibi(NotProven):
    """Why a bias term is not an ALiBi bias (``quiet`` as in NotProven)."""


def slopes_of(bias: torch.Tensor, heads: int, score_rank: int) -> tuple[float, ...]:
    """The per-head slopes of a bias [..] in score layout (rank 3: [B*H or 1, Sq, Sk]; rank 4:
    broadcastable to [B, H, Sq, Sk]), or NotAlibi with the reason."""
    v = bias.detach().double()
    if score_rank == 3 and v.dim() == 3:
        v = v[None] if v.shape[0] == 1 else v.unflatten(0, (-1, heads))
    if v.dim() > 4:
        raise NotAlibi(f"the bias has rank {v.dim()}")
    while v.dim() < 4:
        v = v[None]
    if v.shape[1] not in (1, heads):
        raise NotAlibi(f"the bias has {v.shape[1]} heads, the attention {heads}")
    if not torch.isfinite(v).all():
        raise NotAlibi("the bias also masks (holds -inf or nan): not a pure position bias",
                       quiet=True)
    sk = v.shape[-1]
    if sk == 1:  # broadcast along the keys: a per-row constant, nothing a softmax sees
        raise NotAlibi("the bias is constant along the keys", quiet=True)
    if sk < MIN_KEYS:
        raise NotAlibi(f"the bias spans {sk} key(s) on the example; at least {MIN_KEYS} are "
                       "needed to tell a linear bias")
    d = v - v[..., :1]
    slope = d[..., -1] / (sk - 1)  # [b, h, q]
    tol = 1e-6 * max(1.0, float(v.abs().max()))
    fit = slope[..., None] * torch.arange(sk, dtype=v.dtype)
    if float((d - fit).abs().max()) > tol:
        raise NotAlibi("the bias is not linear in the key position")
    if float((slope - slope[:1, :, :1]).abs().max()) * (sk - 1) > tol:
        raise NotAlibi("the bias's slope differs between batch rows or queries")
    per_head = slope[0, :, 0]
    if not bool((per_head != 0).any()):
        raise NotAlibi("the bias is constant along the keys")
    if per_head.numel() == 1:
        per_head = per_head.expand(heads)
    # fp32 is what the models compute slopes in; their values round-trip exactly
    return tuple(float(torch.tensor(float(s), dtype=torch.float32)) for s in per_head)


def extract_alibi(match, gm: GraphModule, inputs: dict[Node, Any] | None) -> list[str]:
    """Move the proven ALiBi terms of ``match`` (a CoreMatch) into ``match.alibi`` (slopes of
    several terms add up); returns why the other candidate terms are not ALiBi (for the
    site's notes). A mask that fills a bias, ``masked_fill(bias, cond, -inf)`` (Falcon folds
    ALiBi into its causal mask so), is the bias plus a fill term."""
    if not inputs:
        return []
    notes: list[str] = []
    keep: list[MaskTerm] = []
    slopes: list[float] | None = None
    for term in match.terms:
        if term.kind != "tensor":
            keep.append(term)
            continue
        bias, fill = _split_fill(term, gm)
        try:
            _, ones = read_structure(bias, what="bias")
            value = evaluate(bias, gm, inputs, ones)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise NotAlibi("the bias is not a float tensor")
            found = slopes_of(value * term.multiplier, match.num_heads,
                              term.rank or match.score_rank)
        except NotProven as why:
            if not why.quiet:
                notes.append(f"bias {term.node.name} is not ALiBi: {why}")
            keep.append(term)
            continue
        except (RuntimeError, TypeError, ValueError, IndexError, MatchFailure) as exc:
            notes.append(f"bias {term.node.name} is not ALiBi: evaluating it failed "
                         f"({type(exc).__name__})")
            keep.append(term)
            continue
        slopes = list(found) if slopes is None else [a + b for a, b in zip(slopes, found,
                                                                            strict=True)]
        if fill is not None:
            keep.append(fill)
    if slopes is not None:
        match.terms = keep
        match.alibi = tuple(slopes)
    return notes


def _split_fill(term: MaskTerm, gm: GraphModule) -> tuple[Node, MaskTerm | None]:
    """(bias, fill term) of ``masked_fill(bias, cond, v)`` / ``where(cond, bias, v)`` with a
    masking value v; (term.node, None) otherwise."""
    n = term.node
    if term.multiplier <= 0:
        return n, None
    if is_op(n, aten.masked_fill.Scalar, aten.masked_fill.Tensor) and isinstance(n.args[0], Node):
        fill = scalar_constant(n.args[2], gm)
        if fill is not None and fill <= MASKING_VALUE:
            return n.args[0], MaskTerm("fill", n.args[1], fill, keep=False,
                                       multiplier=term.multiplier, rank=term.rank)
    if is_op(n, aten.where.ScalarOther, aten.where.self) and isinstance(n.args[1], Node):
        fill = scalar_constant(n.args[2], gm)
        if fill is not None and fill <= MASKING_VALUE:
            return n.args[1], MaskTerm("fill", n.args[0], fill, keep=True,
                                       multiplier=term.multiplier, rank=term.rank)
    return n, None


__all__ = ["NotAlibi", "extract_alibi", "slopes_of"]
