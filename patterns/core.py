"""Attention cores: an SDPA call, or ``softmax(scores(q @ k^T)) @ v`` in any written form.

Each rule is an anchor (the op it starts from) plus a match function that returns a `CoreMatch`
or raises `MatchFailure` with the reason. Rules are plain data composed with ``+``; `find`
runs them over a graph and returns matches and the reasons every other anchor was rejected.

Operands are normalized before anything is recognized: the product may be ``matmul`` on
[B, H, S, D], ``bmm``/``baddbmm`` on [B*H, S, D] or ``einsum`` with any labels; each becomes
canonical q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv] plus layout steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from rewriter.ir.graph import module_path, static_int
from rewriter.patterns.alibi import extract_alibi
from rewriter.patterns.graph import (
    MatchFailure,
    arg,
    data_users,
    depends_on_input,
    is_op,
    scalar_constant,
    shape,
)
from rewriter.patterns.kv_expansion import peel_expansion
from rewriter.patterns.layout import (
    Operand,
    Step,
    heads_of_flat_batch,
    permute,
    simplify_transpose,
    transpose_last,
    unflatten_heads,
)
from rewriter.patterns.native_window import extract_window
from rewriter.patterns.scores import (
    CASTS,
    VIEWS,
    MaskTerm,
    merge_heads_view,
    same_shape,
    walk_scores,
)

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
SDPA = (aten.scaled_dot_product_attention.default,)


@dataclass
class CoreMatch:
    """A recognized core, normalized. Everything canonicalization needs to emit one node."""

    pattern: str
    anchor: Node
    output: Node  # its uses are redirected to the canonical result
    q: Operand
    k: Operand
    v: Operand
    num_heads: int
    scale: float
    is_causal: bool = False
    softcap: float = 0.0
    dropout: float = 0.0
    kv_expansion: str = "none"
    terms: list[MaskTerm] = field(default_factory=list)  # additive, in score layout
    sdpa_mask: Node | None = None  # an SDPA attn_mask passed through unchanged
    score_rank: int = 4  # 3 when the scores are [B*H, Sq, Sk]
    out_steps: tuple[Step, ...] = ()  # canonical [B, H, Sq, Dv] -> output layout
    nodes: list[Node] = field(default_factory=list)  # the core's own nodes (for rendering)
    alibi: tuple[float, ...] = ()  # ALiBi slopes per query head (patterns.alibi), () = none
    model_window: int | None = None  # the model's own sliding window (patterns.native_window)
    notes: list[str] = field(default_factory=list)  # e.g. why a bias is not ALiBi


@dataclass(frozen=True)
class Rule:
    name: str
    anchors: tuple
    match: Callable[[Node, GraphModule, dict], CoreMatch]

    def __add__(self, other: Rule | RuleSet) -> RuleSet:
        return RuleSet((self,)) + other


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]

    def __add__(self, other: Rule | RuleSet) -> RuleSet:
        extra = other.rules if isinstance(other, RuleSet) else (other,)
        return RuleSet(self.rules + extra)

    def for_anchor(self, node: Node) -> list[Rule]:
        return [r for r in self.rules if node.op == "call_function" and node.target in r.anchors]


# --- SDPA -----------------------------------------------------------------------------------


def match_sdpa(node: Node, gm: GraphModule, cache: dict) -> CoreMatch:
    q, k, v = node.args[:3]
    if any(len(shape(t)) != 4 for t in (q, k, v)):
        raise MatchFailure("scaled_dot_product_attention on non-4-D tensors", node)
    mask = arg(node, 3, "attn_mask")
    dropout = float(arg(node, 4, "dropout_p", 0.0) or 0.0)
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    enable_gqa = bool(arg(node, 7, "enable_gqa", False))
    num_heads = static_int(shape(q)[1])
    head_dim = static_int(shape(q)[3])
    if num_heads is None or head_dim is None:
        raise MatchFailure("query heads or head dim are not static", node)
    if scale is None:
        scale = head_dim**-0.5
    qo, ko, vo = Operand(q), Operand(k), Operand(v)
    kind = "enable_gqa" if enable_gqa and static_int(shape(k)[1]) != num_heads else "none"
    if kind == "none":
        ko, vo, kind = peel_expansion(ko, vo, num_heads)
    return CoreMatch(
        pattern="sdpa", anchor=node, output=node, q=qo, k=ko, v=vo, num_heads=num_heads,
        scale=float(scale), is_causal=is_causal, dropout=dropout, kv_expansion=kind,
        sdpa_mask=mask, nodes=[node],
    )


# --- softmax(q k^T) v -----------------------------------------------------------------------


def match_softmax_core(node: Node, gm: GraphModule, cache: dict) -> CoreMatch:
    x = node.args[0]
    rank = len(shape(x))
    if node.args[1] % rank != rank - 1:
        raise MatchFailure("softmax is not over the last dimension", node)
    form = walk_scores(x, gm)
    product = form.product
    pv, probs_chain = _value_product(node)
    if product.target is aten.einsum.default:
        core = _einsum_operands(product, pv)
    else:
        core = _matmul_operands(product, pv)
    q, k, v, num_heads, out_steps, score_rank, pattern = core
    if form.split_heads is not None and (score_rank != 3 or form.split_heads != num_heads):
        raise MatchFailure(f"the scores are viewed with {form.split_heads} heads, the product "
                           f"has {num_heads}", node)
    for side, operand in (("query", q), ("key", k)):
        if not depends_on_input(operand.node, cache):
            raise MatchFailure(f"the {side} is a learned parameter, not computed from the input "
                               "(attention pooling)", operand.node)
    q, k, scale = _peel_operand_scale(q, k, form.scale, gm)
    terms = list(form.terms)
    if product.target is aten.baddbmm.default:
        # baddbmm(bias, q, k^T, beta, alpha) = beta * bias + alpha * q k^T, then the chain.
        alpha = float(arg(product, 4, "alpha", 1.0))
        beta = float(arg(product, 3, "beta", 1.0))
        scale *= alpha
        bias = MaskTerm("tensor", product.args[0], multiplier=beta * form.scale, rank=3)
        terms.insert(0, bias)
    k, v, kind = peel_expansion(k, v, num_heads)
    return CoreMatch(
        pattern=pattern, anchor=node, output=pv, q=q, k=k, v=v, num_heads=num_heads,
        scale=scale, softcap=form.softcap, kv_expansion=kind, terms=terms,
        score_rank=score_rank, out_steps=out_steps,
        nodes=[product, *reversed(form.nodes), node, *probs_chain, pv],
    )


def _value_product(softmax: Node) -> tuple[Node, list[Node]]:
    """Follow the probabilities through casts and inactive dropout to ``p @ v``."""
    chain: list[Node] = []
    node = softmax
    while True:
        users = data_users(node)
        if len(users) != 1:
            what = "are not used" if not users else "are used outside the attention " \
                "(e.g. returned as attention weights)"
            raise MatchFailure(f"attention probabilities {what}", node)
        user = users[0]
        if is_op(user, *CASTS) or (is_op(user, aten.dropout.default) and not
                                   (len(user.args) > 2 and user.args[2] and user.args[1] > 0)) \
                or (is_op(user, *VIEWS) and (merge_heads_view(user) or same_shape(user))):
            chain.append(user)
            node = user
            continue
        if is_op(user, aten.dropout.default):
            raise MatchFailure("attention dropout is active (train mode)", user)
        if is_op(user, aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return user, chain
        if is_op(user, aten.einsum.default) and user.args[1][0] is node:
            return user, chain
        raise MatchFailure(
            f"probabilities feed {user.name} ({_name(user)}), not a product with values", user)


def _matmul_operands(product: Node, pv: Node):
    if product.target is aten.baddbmm.default:
        a, b = product.args[1], product.args[2]
    else:
        a, b = product.args[0], product.args[1]
    v = pv.args[1]
    rank = len(shape(a))
    if len(shape(b)) != rank or len(shape(v)) != rank:
        raise MatchFailure("q, k and v products of different ranks", product)
    if rank == 4:
        q, k, vo = Operand(a), simplify_transpose(Operand(b, (transpose_last(),))), Operand(v)
        heads = static_int(shape(a)[1])
        out_steps: tuple[Step, ...] = ()
        pattern = "matmul-softmax"
    elif rank == 3:
        heads = heads_of_flat_batch(a)
        unflat = unflatten_heads(heads)
        q = Operand(a, (unflat,))
        k = simplify_transpose(Operand(b, (transpose_last(), unflat)))
        vo = Operand(v, (unflatten_heads(heads),))
        out_steps = (Step(aten.flatten.using_ints, (0, 1)),)
        pattern = "baddbmm-softmax" if product.target is aten.baddbmm.default else "bmm-softmax"
        if product.target is aten.matmul.default:
            pattern = "matmul3d-softmax"
    else:
        raise MatchFailure(f"attention product on rank-{rank} tensors", product)
    if heads is None:
        raise MatchFailure("the number of heads is not static", product)
    return q, k, vo, heads, out_steps, rank, pattern


def _einsum_operands(product: Node, pv: Node):
    eq = _expand_ellipsis(product.args[0], [len(shape(t)) for t in product.args[1]])
    (la, lb), lo = _parse_einsum(eq, product)
    if len(lo) not in (3, 4) or len(product.args[1]) != 2:
        raise MatchFailure(f"einsum {eq!r} does not produce [batch..., q, k] scores", product)
    q_l, k_l = lo[-2], lo[-1]
    batch = list(lo[:-2])
    contracted = (set(la) & set(lb)) - set(lo)
    if len(contracted) != 1 or q_l not in la or k_l not in lb or q_l in lb or k_l in la:
        raise MatchFailure(f"einsum {eq!r} is not q @ k^T", product)
    (d_l,) = contracted
    if any(b not in la or b not in lb for b in batch):
        raise MatchFailure(f"einsum {eq!r} broadcasts a batch label", product)
    a, b = product.args[1]
    q = Operand(a, _perm_step(la, batch + [q_l, d_l]))
    k = Operand(b, _perm_step(lb, batch + [k_l, d_l]))
    v_node, (lp, lv), lout = _pv_einsum(pv)
    pbatch, pq, pk = list(lp[:-2]), lp[-2], lp[-1]
    dv = [c for c in lv if c not in lp]
    if len(dv) != 1 or pk not in lv or any(c not in lv for c in pbatch):
        raise MatchFailure("value einsum is not p @ v", pv)
    vo = Operand(v_node, _perm_step(lv, pbatch + [pk, dv[0]]))
    canonical = pbatch + [pq, dv[0]]
    if sorted(lout) != sorted(canonical):
        raise MatchFailure("value einsum output drops or adds labels", pv)
    out_steps = _perm_step(canonical, list(lout))
    if len(batch) == 1:
        heads = heads_of_flat_batch(a) if not q.steps else None
        if heads is None:
            raise MatchFailure("einsum over a flattened batch*heads with permuted operands",
                               product)
        unflat = unflatten_heads(heads)
        q, k, vo = (Operand(o.node, (*o.steps, unflat)) for o in (q, k, vo))
        out_steps = (Step(aten.flatten.using_ints, (0, 1)), *out_steps)
    else:
        heads = static_int(q.canonical_shape()[1])
    k = simplify_transpose(k)
    return q, k, vo, heads, out_steps, len(lo), "einsum-softmax"


def _pv_einsum(pv: Node):
    if pv.target is not aten.einsum.default:
        raise MatchFailure("scores by einsum but values by matmul", pv)
    eq = _expand_ellipsis(pv.args[0], [len(shape(t)) for t in pv.args[1]])
    (lp, lv), lo = _parse_einsum(eq, pv)
    return pv.args[1][1], (lp, lv), lo


def _perm_step(have, want) -> tuple[Step, ...]:
    perm = [have.index(c) for c in want]
    return () if perm == list(range(len(perm))) else (permute(perm),)


def _parse_einsum(eq: str, node: Node):
    eq = eq.replace(" ", "")
    if "->" not in eq:
        raise MatchFailure(f"implicit-output einsum {eq!r}", node)
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        raise MatchFailure(f"einsum {eq!r} does not take two operands", node)
    return (list(ins[0]), list(ins[1])), list(out)


def _expand_ellipsis(eq: str, ranks: list[int]) -> str:
    if "..." not in eq:
        return eq
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n = max(r - (len(s) - 3) for s, r in zip(ins, ranks, strict=True) if "..." in s)
    fill = "".join(spare[:n])
    ins = [s.replace("...", fill[n - (r - (len(s) - 3)):]) for s, r in zip(ins, ranks, strict=True)]
    return ",".join(ins) + "->" + out.replace("...", fill)


def _peel_operand_scale(q: Operand, k: Operand, scale: float, gm: GraphModule):
    """``(q * c) @ k^T``: move scalar multiplies on q or k (before any layout step) into scale."""
    out = []
    for operand in (q, k):
        node = operand.node
        while is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            c = scalar_constant(node.args[1], gm)
            if c is None:
                break
            scale *= c if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
            node = node.args[0]
        out.append(Operand(node, operand.steps))
    return out[0], out[1], scale


def _name(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


SDPA_CALL = Rule("sdpa", SDPA, match_sdpa)
SOFTMAX_CORE = Rule("softmax-core", SOFTMAX, match_softmax_core)
DEFAULT_RULES = SDPA_CALL + SOFTMAX_CORE


@dataclass
class Rejection:
    node: str
    op: str
    module_path: str
    reason: str


def find(
    gm: GraphModule, rules: RuleSet = DEFAULT_RULES, inputs: dict[Node, Any] | None = None
) -> tuple[list[CoreMatch], list[Rejection]]:
    """Every anchor in graph order: matched cores, and why the other anchors are not attention.

    ``inputs``: example values of the graph's placeholders; with them an additive bias that is
    provably ALiBi becomes the core's ``alibi`` slopes (rewriter.patterns.alibi), and a mask
    that is provably causal + a sliding window the core's ``model_window``
    (rewriter.patterns.native_window)."""
    matches: list[CoreMatch] = []
    rejected: list[Rejection] = []
    cache: dict = {}
    windows: dict = {}  # proven windows by mask (layers share their masks)
    for node in gm.graph.nodes:
        rules_here = rules.for_anchor(node)
        if not rules_here:
            continue
        reasons = []
        for rule in rules_here:
            try:
                match = rule.match(node, gm, cache)
                if inputs:
                    _find_alibi(match, gm, inputs)
                    match.notes += extract_window(match, gm, inputs, windows)
                matches.append(match)
                break
            except MatchFailure as failure:
                reasons.append(failure.reason)
        else:
            rejected.append(Rejection(node.name, _name(node), module_path(node),
                                      "; ".join(reasons)))
    return matches, rejected


def _find_alibi(match: CoreMatch, gm: GraphModule, inputs: dict[Node, Any]) -> None:
    """ALiBi among the additive terms, or in a float SDPA mask (then the mask is rebuilt from
    what is left of it)."""
    mask = match.sdpa_mask
    if isinstance(mask, Node) and not match.terms and mask.meta.get("val") is not None \
            and mask.meta["val"].is_floating_point():
        match.terms, match.sdpa_mask = [MaskTerm("tensor", mask, rank=4)], None
        match.notes += extract_alibi(match, gm, inputs)
        if not match.alibi:
            match.terms, match.sdpa_mask = [], mask
    elif match.terms:
        match.notes += extract_alibi(match, gm, inputs)


def layer_index(path: str) -> int | None:
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


__all__ = ["CoreMatch", "Rule", "RuleSet", "Rejection", "find", "DEFAULT_RULES"]
