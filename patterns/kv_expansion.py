"""KV expansion: K/V heads repeated to match the query heads (GQA written out by the model).

``repeat_kv`` (expand + reshape), ``repeat_interleave(dim=1)`` and friends all compute
``k_rep[:, h] = k[:, h // group]``. Rather than matching those op sequences, we look for the
nearest ancestor of K whose index tensor, repeated that way, *is* K's index tensor."""

from __future__ import annotations

import torch
from torch.fx import Node

from rewriter.ir.graph import concrete, val
from rewriter.patterns.graph import shape
from rewriter.patterns.head_copies import peel_head_copies
from rewriter.patterns.layout import Operand, chain_up, iota, propagate

aten = torch.ops.aten


def peel_expansion(k: Operand, v: Operand, num_heads: int) -> tuple[Operand, Operand, str]:
    """(k, v, kind): k and v without their head repetition, or unchanged with kind "none"."""
    peeled_k = _peel(k, num_heads)
    peeled_v = _peel(v, num_heads)
    if peeled_k is None or peeled_v is None:
        # Heads copied before a head-uniform transform such as RoPE (Falcon-40B style).
        return peel_head_copies(k, v, num_heads) or (k, v, "none")
    (k0, kind_k, hk), (v0, _kind_v, hv) = peeled_k, peeled_v
    if hk != hv:
        return k, v, "none"
    return k0, v0, kind_k


def _peel(operand: Operand, num_heads: int) -> tuple[Operand, str, int] | None:
    up = chain_up(operand.node)
    if len(up) == 1:
        return None
    path = list(reversed(up))  # root ... operand.node
    target = operand.canonical_index(path)
    if target.dim() != 4 or target.shape[1] != num_heads:
        return None
    for i, candidate in enumerate(up[1:], start=1):
        if not isinstance(val(candidate), torch.Tensor):
            continue  # a split/chunk tuple on the way up
        dims = concrete(shape(candidate))
        if len(dims) != 4:
            continue
        kv_heads = dims[1]
        if kv_heads >= num_heads or num_heads % kv_heads:
            continue
        if (dims[0], dims[2], dims[3]) != (target.shape[0], target.shape[2], target.shape[3]):
            continue
        index = propagate(path[: len(path) - i], iota(path[0]))
        if torch.equal(index.repeat_interleave(num_heads // kv_heads, dim=1), target):
            return Operand(candidate), _describe(up[:i]), kv_heads
    return None


def _describe(ops: list[Node]) -> str:
    targets = {n.target for n in ops}
    if aten.repeat_interleave.self_int in targets:
        return "repeat_interleave"
    if aten.expand.default in targets:
        return "repeat_kv"
    return "expanded"
