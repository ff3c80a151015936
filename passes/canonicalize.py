"""Canonicalize: each matched core (with its KV expansion) becomes one rewriter.attention node.

An identity transform. New nodes get their traced value (meta["val"]) computed on the spot in
the graph's fake mode, so the graph stays shape-propagated without re-running the whole model.
"""

from __future__ import annotations

from collections import deque

import torch
from torch.fx import GraphModule, Node

from rewriter.ir.graph import ATTENTION, Emitter, cleanup, concrete, module_path, static_int
from rewriter.ir.masks import MaskSpec
from rewriter.ir.site import AttentionSite
from rewriter.patterns.core import CoreMatch, layer_index
from rewriter.patterns.graph import is_op, shape
from rewriter.patterns.layout import Operand
from rewriter.patterns.projections import trace_input_projection, trace_output_projection

aten = torch.ops.aten


def describe_site(match: CoreMatch, index: int) -> AttentionSite:
    q_shape, k_shape, v_shape = (o.canonical_shape() for o in (match.q, match.k, match.v))
    head_dim, v_head_dim = static_int(q_shape[3]), static_int(v_shape[3])
    kv_heads = static_int(k_shape[1])
    q_trace = trace_input_projection(match.q)
    k_trace = trace_input_projection(match.k)
    v_trace = trace_input_projection(match.v)
    canonical_out = (*concrete(q_shape[:3]), concrete(v_shape[3]))
    o_proj = trace_output_projection(match.output, canonical_out, match.out_steps)
    if q_trace.source is not None and k_trace.source is not None:
        cross = q_trace.source is not k_trace.source
    else:
        cross = not _same_size(q_shape[2], k_shape[2])
    positional = q_trace.positional if q_trace.positional == k_trace.positional else \
        f"q:{q_trace.positional},k:{k_trace.positional}"
    notes = [f"{w}: {t.reason}" for w, t in (("q", q_trace), ("k", k_trace), ("v", v_trace))
             if t.reason] + list(match.notes)
    if match.alibi:
        positional = "alibi" if positional == "none" else f"{positional}+alibi"
    path = module_path(match.anchor)
    return AttentionSite(
        index=index, pattern=match.pattern, num_heads=match.num_heads,
        num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
        scale=float(match.scale), is_causal=match.is_causal, mask=describe_mask(match),
        softcap=match.softcap, dropout=match.dropout, kv_expansion=match.kv_expansion,
        positional=positional, cross=cross, module_path=path, layer=layer_index(path),
        q_proj=q_trace.projection, k_proj=k_trace.projection, v_proj=v_trace.projection,
        o_proj=o_proj, notes=notes, alibi=tuple(match.alibi), sparsity=_sparsity(match),
        model_window=match.model_window,
    )


def _sparsity(match: CoreMatch) -> str:
    """The canonical ``sparsity`` attribute: the model's own window, if it has one."""
    return MaskSpec(window=match.model_window).format() if match.model_window else ""


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return a == b


def describe_mask(match: CoreMatch) -> str:
    roots = [match.sdpa_mask] if match.sdpa_mask is not None else [t.node for t in match.terms]
    roots = [r for r in roots if isinstance(r, Node)]
    kinds: list[str] = []
    if match.is_causal:
        kinds.append("causal")
    if roots:
        seen, queue, budget = set(roots), deque(roots), 400
        flags = set()
        while queue and budget:
            n = queue.popleft()
            budget -= 1
            if n.op == "placeholder":
                flags.add("padding")
                continue
            if is_op(n, aten.embedding.default) and n.args[0].op == "get_attr":
                flags.add("relative-bias")
                continue  # its indices are position buckets, not a mask
            if is_op(n, aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor,
                     aten.tril.default, aten.triu.default, aten.le.Scalar, aten.gt.Scalar):
                flags.add("causal-mask")
            if is_op(n, aten.sym_size.int):
                continue  # a size, not data
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    queue.append(a)
        order = ("relative-bias", "causal-mask", "padding")
        kinds += [k for k in order if k in flags] or ["bias"]
    return "+".join(kinds) or "none"


def emit_canonical(match: CoreMatch, emit: Emitter) -> Node:
    """Emit rewriter.attention for one core and redirect the core's output to it."""
    emit.meta = {k: match.anchor.meta[k] for k in ("nn_module_stack", "stack_trace")
                 if k in match.anchor.meta}
    with emit.graph.inserting_before(match.output):
        q, k, v = (emit_operand(emit, o) for o in (match.q, match.k, match.v))
        mask = match.sdpa_mask if match.sdpa_mask is not None else _emit_mask(match, emit)
        attrs = {"scale": float(match.scale), "is_causal": match.is_causal,
                 "sparsity": _sparsity(match), "softcap": float(match.softcap)}
        if match.alibi:
            attrs["alibi"] = [float(a) for a in match.alibi]
        out = emit.call(ATTENTION, (q, k, v, mask), attrs)
        core = out
        for step in match.out_steps:
            out = emit.call(step.target, (out, *step.args))
    match.output.replace_all_uses_with(out)
    return core


def _emit_mask(match: CoreMatch, emit: Emitter) -> Node | None:
    total = None
    for term in match.terms:
        if term.kind == "tensor":
            t = term.node
            if term.multiplier != 1.0:
                t = emit.call(aten.mul.Tensor, (t, term.multiplier))
        else:
            fill = term.value * term.multiplier
            t = emit.call(aten.where.Scalar, (term.node, 0.0, fill) if term.keep
                          else (term.node, fill, 0.0))
        if (term.rank or match.score_rank) == 3 and len(shape(t)) == 3:
            first = static_int(shape(t)[0])
            t = emit.call(aten.unsqueeze.default, (t, 0)) if first == 1 else \
                emit.call(aten.unflatten.int, (t, 0, [-1, match.num_heads]))
        total = t if total is None else emit.call(aten.add.Tensor, (total, t))
    return total


def emit_operand(emit: Emitter, operand: Operand) -> Node:
    """Replay an operand's layout steps from its source node (q/k/v as [B, H, S, D])."""
    node = operand.node
    for step in operand.steps:
        node = emit.call(step.target, (node, *step.args))
    return node


def canonicalize(gm: GraphModule, matches: list[CoreMatch]) -> list[AttentionSite]:
    """Rewrite ``gm`` in place (callers pass a fresh copy); return the sites, in graph order."""
    emit = Emitter(gm)
    sites = []
    for i, match in enumerate(matches):
        site = describe_site(match, i)
        site.node = emit_canonical(match, emit).name
        sites.append(site)
    cleanup(gm)
    return sites


