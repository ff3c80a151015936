"""A model's own sliding window, read as the canonical ``sparsity`` (``window=W``).

Gemma2, Mistral and Qwen2 (``sliding_window``) build a mask that keeps the last W keys of each
query: ``kv_idx <= q_idx and q_idx - kv_idx < W``. Left as an opaque mask it is exact in the
program, but a decoder cannot serve it (it replaces the model's mask with its own causal one)
and variants, kernels and ONNX cannot see the band. Proven, it becomes ``is_causal=True`` with
``sparsity="window=W"`` (rewriter.ir.masks), which every backend and the bounded KV cache know.

The proof, for the core's whole mask (every additive term and fill, or an SDPA mask):

1. Structure: the mask reads inputs only through their shapes (rewriter.patterns.static_values).
2. Value: evaluated at the captured length and at a probe length L, broadcast over batch and
   heads, every row keeps exactly ``causal and within W``, with one W for both lengths. L is
   longer than every integer constant in the mask (a window is written as one: ``sub(i, W)``)
   and at most ``MAX_PROBE``; a window not shorter than L is no window at that length, so the
   mask is left as it is.

Shape glossary: Sq queries, Sk keys (Sq == Sk: a prefill capture), L the probe length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from rewriter.ir.graph import val
from rewriter.patterns.graph import MatchFailure
from rewriter.patterns.scores import MASKING_VALUE, MaskTerm
from rewriter.patterns.static_values import (
    NotProven,
    ancestors,
    evaluate,
    read_structure,
    resized_inputs,
)

MAX_PROBE = 8192  # the probe evaluates an [L, L] mask: up to 256 MB in fp32


def extract_window(match, gm: GraphModule, inputs: dict[Node, Any] | None,
                   cache: dict | None = None) -> list[str]:
    """Turn a proven causal + sliding-window mask of ``match`` (a CoreMatch) into
    ``is_causal`` + ``model_window``; returns a note saying what was found (nothing when the
    mask is not proven: it stays opaque, which is exact). ``cache`` memoizes by mask node
    (layers share masks)."""
    if not inputs or match.alibi or match.model_window:
        return []
    parts = _mask_parts(match)
    if not parts:
        return []
    key = tuple((p.kind, p.node, p.keep, p.multiplier) for p in parts)
    if cache is not None and key in cache:
        window = cache[key]
    else:
        try:
            window = _prove_window(parts, gm, inputs)
        except NotProven:
            window = None
        except (RuntimeError, TypeError, ValueError, IndexError, MatchFailure):
            window = None  # evaluation failed: the mask stays opaque, which is exact
        if cache is not None:
            cache[key] = window
    if window is None:
        return []
    match.terms, match.sdpa_mask = [], None
    match.is_causal = True
    match.model_window = window
    return [f"the model's own sliding window ({window} keys) is sparsity window={window}"]


def _mask_parts(match) -> list[MaskTerm]:
    if match.sdpa_mask is not None:
        return [MaskTerm("tensor", match.sdpa_mask, rank=4)] if not match.terms else []
    return list(match.terms)


def _prove_window(parts: list[MaskTerm], gm: GraphModule, inputs: dict[Node, Any]
                  ) -> int | None:
    for part in parts:
        read_structure(part.node, what="mask", cumsum=False)
    symbol = _key_length(parts)
    if symbol is None:
        raise NotProven("the mask's key length is not the captured sequence length")
    here = _keep(parts, gm, inputs)
    if not torch.equal(here, _band(here.shape[-1], int(here[-1].sum()))):
        raise NotProven("the mask is not causal + sliding window", quiet=True)
    probe = min(MAX_PROBE, max(2 * here.shape[-1], _largest_constant(parts) + 2))
    far = _keep(parts, gm, resized_inputs(inputs, symbol, probe))
    if far.shape[-1] != probe:
        raise NotProven("the mask did not take the probe length")
    window = int(far[-1].sum())
    if window >= probe:
        return None  # plain causal at the probe length: not a window (left as it is)
    for keep in (here, far):
        if not torch.equal(keep, _band(keep.shape[-1], window)):
            raise NotProven("the mask is not causal + sliding window")
    return window


def _key_length(parts: list[MaskTerm]) -> torch.SymInt | None:
    """The symbol of the masks' key axis when it is a plain dynamic size."""
    for part in parts:
        v = val(part.node)
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            sk = v.shape[-1]
            if isinstance(sk, torch.SymInt) and sk.node.expr.is_Symbol:
                return sk
    return None


def _keep(parts: list[MaskTerm], gm: GraphModule, inputs: dict[Node, Any]) -> torch.Tensor:
    """The keys each query keeps, [Sq, Sk] bool: the same for every batch row and head."""
    keep = None
    for part in parts:
        value = evaluate(part.node, gm, inputs)
        if not isinstance(value, torch.Tensor):
            raise NotProven("the mask is not a tensor")
        if part.kind == "tensor":
            if value.dtype == torch.bool:
                kept = value
            else:
                v = value.double() * part.multiplier
                masked = v <= MASKING_VALUE
                if not bool(((v == 0) | masked).all()):
                    raise NotProven("the mask adds values other than 0 and a masking value")
                kept = ~masked
        else:
            if part.value * part.multiplier > MASKING_VALUE:
                raise NotProven("a fill is not a masking value")
            kept = value.bool() if part.keep else ~value.bool()
        keep = kept if keep is None else keep & kept
    if keep.dim() < 2:
        raise NotProven("the mask has no [Sq, Sk] axes")
    rows = keep.reshape(-1, *keep.shape[-2:])
    if not bool((rows == rows[:1]).all()):
        raise NotProven("the mask differs between batch rows or heads")
    if rows.shape[-1] != rows.shape[-2]:
        raise NotProven("the mask is not square (not a prefill)")
    return rows[0]


def _band(length: int, window: int) -> torch.Tensor:
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & (i - j < window)


def _largest_constant(parts: list[MaskTerm]) -> int:
    """The largest integer constant the masks' subgraphs use (a window size is one)."""
    best = 0
    for part in parts:
        for n in ancestors(part.node):
            for a in (*n.args, *n.kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and abs(a) < 2**31:
                    best = max(best, abs(a))
    return best


__all__ = ["MAX_PROBE", "extract_window"]
