"""The canonical attention op: ``torch.ops.rewriter.attention``.

Shape glossary:
    B   batch
    Hq  query heads            Hkv  key/value heads (Hq % Hkv == 0, query head h reads KV head
                               h // (Hq // Hkv), the grouping of SDPA's ``enable_gqa``)
    Sq  query length           Sk   key/value length
    D   head dim of q and k    Dv   head dim of v

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv]  ->  out [B, Hq, Sq, Dv]

Semantics, in this order::

    s = (q @ k^T) * scale
    s = softcap * tanh(s / softcap)            if softcap > 0
    s = s + alibi[h] * kv_idx                  if alibi (ALiBi: one slope per query head h;
                                               kv_idx the key's index 0..Sk-1, which is its
                                               position in a KV cache: the query's own position
                                               only shifts a row, and softmax ignores that)
    s = s + attn_mask                          float mask (additive), broadcast to [B, Hq, Sq, Sk]
    s = s.masked_fill(~attn_mask, -inf)        bool mask (True = attend)
    s = s.masked_fill(~causal, -inf)           if is_causal (top-left aligned, as in SDPA)
    s = s.masked_fill(~sparsity_mask, -inf)    if sparsity (a MaskSpec string, bottom-right
                                               aligned: see rewriter.ir.masks; or a dynamic
                                               top-k block selection: rewriter.ir.topk)
    out = softmax(s, -1) @ v                   (a row with no key left gives zeros)

Canonicalizing a model is an identity transform: the eager implementation defers to SDPA
where the semantics coincide, so a canonicalized model matches the original to fp32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rewriter.ir import blocksparse
from rewriter.ir.masks import MaskSpec, causal_mask
from rewriter.ir.topk import TopKSpec, is_topk, topk_attention

__all__ = ["alibi_bias", "attention", "attention_grads", "bounded_cached_attention",
           "cached_attention", "evict", "reference_attention", "reference_probs", "with_alibi"]


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "rewriter::attention expects 4-D q, k, v ([B, H, S, D])")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")


def alibi_bias(alibi: Sequence[float], sk: int, device=None,
               dtype: torch.dtype = torch.float32, start: int = 0) -> Tensor:
    """[1, H, 1, Sk] additive ALiBi bias: ``alibi[h] * (start + kv_idx)``, computed in fp32 (as
    BLOOM and MPT compute theirs) and cast to ``dtype``."""
    slopes = torch.tensor([float(a) for a in alibi], dtype=torch.float32, device=device)
    pos = torch.arange(start, start + sk, device=device, dtype=torch.float32)
    return (slopes.view(1, -1, 1, 1) * pos.view(1, 1, 1, -1)).to(dtype)


def with_alibi(attn_mask: Tensor | None, alibi: Sequence[float] | None, q: Tensor,
               sk: int) -> Tensor | None:
    """``attn_mask`` with the ALiBi bias folded in: a float mask broadcastable to
    [B, Hq, Sq, Sk] (a bool mask becomes -inf where it is False). Unchanged without alibi."""
    if not alibi:
        return attn_mask
    torch._check(len(alibi) == q.shape[1],
                 lambda: f"alibi has {len(alibi)} slopes for {q.shape[1]} query heads")
    acc = torch.promote_types(q.dtype, torch.float32)
    bias = alibi_bias(alibi, sk, q.device, acc)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(acc) + bias


def reference_probs(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> Tensor:
    """Attention probabilities [B, Hq, Sq, Sk] in fp32, or float64 for float64 inputs (rows
    with no key left are zeros)."""
    _check_shapes(q, k, k)
    attn_mask = with_alibi(attn_mask, alibi, q, k.shape[-2])
    keys = k  # as given: top-k selects per KV head
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 stays
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(acc)
    sq, sk = q.shape[-2], k.shape[-2]
    if is_causal:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if sparsity:
        s = s.masked_fill(~sparsity_keep(sparsity, q, keys), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # a row with every key masked attends to nothing


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> Tensor:
    """Naive reference: materializes the scores. The definition the other paths are held to."""
    _check_shapes(q, k, v)
    p = reference_probs(q, k, attn_mask, scale=scale, is_causal=is_causal, sparsity=sparsity,
                        softcap=softcap, alibi=alibi)
    group = q.shape[1] // v.shape[1]
    if group > 1:
        v = v.repeat_interleave(group, dim=1)
    return torch.matmul(p.to(q.dtype), v)


def sparsity_mask(sparsity: str, sq: int, sk: int, num_heads: int, device) -> Tensor:
    """[1, H or 1, Sq, Sk] bool keep-mask of a MaskSpec string."""
    return MaskSpec.parse(sparsity).dense(sq, sk, num_heads, device=device).unsqueeze(0)


def sparsity_keep(sparsity: str, q: Tensor, k: Tensor) -> Tensor:
    """The keep-mask of any ``sparsity`` string: [1, H or 1, Sq, Sk] for a static MaskSpec,
    [B, Hq, Sq, Sk] for top-k (rewriter.ir.topk), which reads q and k (as given, before any
    GQA repeat)."""
    if is_topk(sparsity):
        return TopKSpec.parse(sparsity).keep(q, k)
    return sparsity_mask(sparsity, q.shape[-2], k.shape[-2], q.shape[1], q.device)


@torch.library.custom_op("rewriter::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> Tensor:
    """Canonical attention (see the module docstring for shapes and semantics)."""
    if alibi:  # an additive bias like any float mask: every path below takes one
        attn_mask = with_alibi(attn_mask, alibi, q, k.shape[-2])
    if softcap > 0:
        return reference_attention(
            q, k, v, attn_mask, scale=scale, is_causal=is_causal, sparsity=sparsity,
            softcap=softcap,
        )
    gqa = q.shape[1] != k.shape[1]
    sq, sk = q.shape[-2], k.shape[-2]
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype
    if is_topk(sparsity):
        if is_causal and sq < sk:  # top-left: stricter than top-k's own bottom-right one
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            attn_mask = causal if attn_mask is None else (
                attn_mask & causal if attn_mask.dtype == torch.bool
                else attn_mask.masked_fill(~causal, float("-inf")))
        return topk_attention(q, k, v, attn_mask, scale=scale, spec=TopKSpec.parse(sparsity))
    if sparsity and (attn_mask is None or attn_mask.dim() < 4 or attn_mask.shape[1] == 1):
        parts = _head_parts(sparsity, q.shape[1], k.shape[1])
        if parts is not None:  # full and windowed heads: each part on its fastest path
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
            for q_heads, kv_heads, spec in parts:
                out[:, q_heads] = attention(q[:, q_heads], k[:, kv_heads], v[:, kv_heads],
                                            attn_mask, scale=scale, is_causal=is_causal,
                                            sparsity=spec)
            return out
    if sparsity and blocksparse.worthwhile(sparsity, sq, sk, q.shape[1], is_causal):
        # Few keys per query block: compute only those (rewriter.ir.blocksparse).
        return blocksparse.attention(q, k, v, attn_mask, scale=scale, is_causal=is_causal,
                                     sparsity=sparsity)
    if sparsity:
        # Fold the static mask (and causal) into one boolean mask for SDPA.
        keep = sparsity_mask(sparsity, sq, sk, q.shape[1], q.device)
        if is_causal:
            keep = keep & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            is_causal = False
        if attn_mask is None:
            attn_mask = keep
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                             enable_gqa=gqa)
        return torch.nan_to_num(out, nan=0.0)
    # SDPA rejects a mask together with is_causal; fold the causal part into the mask.
    if is_causal and attn_mask is not None:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def _head_parts(sparsity: str, hq: int, hkv: int) -> list[tuple[list, list, str]] | None:
    """A per-head table of whole KV heads (sparse:heads=auto's output) as a full part and a
    windowed part (MaskSpec.kv_head_parts): full heads then run SDPA's causal kernel and
    windowed ones the block-sparse path, instead of all heads paying for a masked dense call.
    None when there is nothing to split."""
    if is_topk(sparsity):
        return None
    parts = MaskSpec.parse(sparsity).kv_head_parts(hq, hkv)
    return None if parts is None else [(qh, kvh, m.format()) for qh, kvh, m in parts]


@attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, *, scale, is_causal=False, sparsity="", softcap=0.0,
                    alibi=None):
    _check_shapes(q, k, v)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@torch.library.custom_op("rewriter::cached_attention", mutates_args=())
def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    *,
    scale: float,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal self-attention of S new tokens over a KV cache (the decoder's form of the op).

        q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv],
        past_key [B, Hkv, P, D], past_value [B, Hkv, P, Dv]
        -> out [B, Hq, S, Dv], present_key [B, Hkv, P+S, D], present_value [B, Hkv, P+S, Dv]

    present = cat(past, new) on the sequence axis; query i sits at position P+i and sees keys
    0..P+i (bottom-right causal), then ``sparsity``, ``softcap`` and ``alibi`` as in
    ``attention`` (cache entry j is position j, so ALiBi's ``slope * kv_idx`` is exact)."""
    present_key = torch.cat([past_key, k], dim=2)
    present_value = torch.cat([past_value, v], dim=2)
    out = _attend_cache(q, present_key, present_value, scale=scale, sparsity=sparsity,
                        softcap=softcap, alibi=alibi)
    return out, present_key, present_value


def _attend_cache(q: Tensor, keys: Tensor, values: Tensor, *, scale: float, sparsity: str,
                  softcap: float, alibi: Sequence[float] | None = None) -> Tensor:
    """S queries at the end of contiguous keys 0..T-1, bottom-right causal, with the cheapest
    equivalent mask: none for one query (it sees every key), SDPA's own causal flag when there
    is no past (top-left == bottom-right), else an explicit [S, T] mask."""
    new, total = q.shape[2], keys.shape[2]
    extra = {"alibi": list(alibi)} if alibi else {}
    if new == 1:
        return attention(q, keys, values, scale=scale, sparsity=sparsity, softcap=softcap,
                         **extra)
    if new == total:
        return attention(q, keys, values, scale=scale, is_causal=True, sparsity=sparsity,
                         softcap=softcap, **extra)
    keep = causal_mask(new, total).to(q.device)
    return attention(q, keys, values, keep, scale=scale, sparsity=sparsity, softcap=softcap,
                     **extra)


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, past_key, past_value, *, scale, sparsity="", softcap=0.0,
                           alibi=None):
    _check_shapes(q, k, v)
    torch._check(past_key.dim() == 4 and past_value.dim() == 4,
                 lambda: "rewriter::cached_attention expects 4-D past_key/past_value")
    present_key = past_key.new_empty((*k.shape[:2], past_key.shape[2] + k.shape[2], k.shape[3]))
    present_value = past_value.new_empty(
        (*v.shape[:2], past_value.shape[2] + v.shape[2], v.shape[3]))
    return q.new_empty((*q.shape[:-1], v.shape[-1])), present_key, present_value


@torch.library.custom_op("rewriter::bounded_cached_attention", mutates_args=())
def bounded_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    past_length: Tensor,
    *,
    scale: float,
    sparsity: str,
    bound: int,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``cached_attention`` for a sink + window mask, over a cache that keeps only what the
    mask can still read (StreamingLLM): the first ``sink`` positions and the last
    ``bound - sink``. ``bound`` must be at least MaskSpec.cache_bound (sink + W - 1, W the
    largest window of the heads; more when another site shares the cache), else eviction drops
    keys the mask reads.

        past_key [B, Hkv, L, D], past_value [B, Hkv, L, Dv], L <= bound
        past_length: int64 scalar P, the tokens seen before these S (P >= L)
        -> out [B, Hq, S, Dv], present_key/value [B, Hkv, min(L + S, bound), D/Dv]

    Cache entry j holds position j when j < sink, else P - L + j: the kept tail is contiguous
    and ends at P - 1 (while nothing is evicted, L == P and entry j is position j). Keys are
    cached after their positional transform (RoPE), so eviction is exact: the output equals
    ``cached_attention`` over the whole cache."""
    spec = MaskSpec.parse(sparsity)
    keys, values = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    past, cached, new = int(past_length), past_key.shape[2], q.shape[2]
    heads = q.shape[1]
    if new == 1 and bound == spec.cache_bound(heads) and spec.dilation == 1 \
            and len(set(spec.window_list(heads))) == 1:
        # one query over a cache kept at exactly sink + W - 1: every key is in its window
        out = attention(q, keys, values, scale=scale, softcap=softcap)
    elif cached == past:  # nothing evicted: positions 0..P+S-1, the plain cached op's case
        out = _attend_cache(q, keys, values, scale=scale, sparsity=sparsity, softcap=softcap)
    else:
        pos_q = torch.arange(past, past + new, device=q.device)
        sink = min(spec.sink, cached)
        pos_k = torch.cat([torch.arange(sink, device=q.device),
                           torch.arange(past - cached + sink, past + new, device=q.device)])
        keep = spec.keep_at(pos_q, pos_k, heads) & (pos_k.view(1, -1) <= pos_q.view(-1, 1))
        out = attention(q, keys, values, keep.unsqueeze(0), scale=scale, softcap=softcap)
    return out, evict(keys, spec.sink, bound), evict(values, spec.sink, bound)


def evict(cache: Tensor, sink: int, bound: int) -> Tensor:
    """[B, H, T, D] -> [B, H, min(T, bound), D]: the first ``sink`` positions and the last
    ``bound - sink`` (a copy, so the caller may drop the longer tensor)."""
    total = cache.shape[2]
    if total <= bound:
        return cache.clone()
    tail = bound - sink
    return torch.cat([cache[:, :, :sink], cache.narrow(2, total - tail, tail)], dim=2)


@bounded_cached_attention.register_fake
def _bounded_cached_attention_fake(q, k, v, past_key, past_value, past_length, *, scale,
                                   sparsity, bound, softcap=0.0):
    _check_shapes(q, k, v)
    length = torch.sym_min(past_key.shape[2] + k.shape[2], bound)
    present_key = past_key.new_empty((*k.shape[:2], length, k.shape[3]))
    present_value = past_value.new_empty((*v.shape[:2], length, v.shape[3]))
    return q.new_empty((*q.shape[:-1], v.shape[-1])), present_key, present_value


# --- gradients --------------------------------------------------------------------------------
# The canonical ops train: their backward is the reference math's, written out so that a row
# with no key left (probabilities all zero) gets zero gradients instead of NaNs.


def attention_grads(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, grad_out: Tensor,
                    *, scale: float, is_causal: bool = False, sparsity: str = "",
                    softcap: float = 0.0, alibi: Sequence[float] | None = None,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dmask) of ``attention`` for the output gradient ``grad_out`` [B, Hq, Sq, Dv];
    dmask is None unless the mask is a float (additive) mask, then it has the mask's shape."""
    group = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    kk = k.repeat_interleave(group, dim=1).to(acc) if group > 1 else k.to(acc)
    vv = v.repeat_interleave(group, dim=1).to(acc) if group > 1 else v.to(acc)
    p = reference_probs(q, k, attn_mask, scale=scale, is_causal=is_causal, sparsity=sparsity,
                        softcap=softcap, alibi=alibi)  # [B, Hq, Sq, Sk]
    go = grad_out.to(acc)
    dv = p.transpose(-1, -2) @ go  # [B, Hq, Sk, Dv]
    dp = go @ vv.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax backward; zero where p is zero
    dmask = None
    if attn_mask is not None and attn_mask.is_floating_point():
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    if softcap > 0:
        raw = (q.to(acc) @ kk.transpose(-1, -2)) * scale
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)) * scale
    if group > 1:  # query heads of one group read the same KV head: their gradients add up
        dk = dk.unflatten(1, (k.shape[1], group)).sum(2)
        dv = dv.unflatten(1, (v.shape[1], group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _attention_setup(ctx, inputs, keyword_only_inputs, output):
    q, k, v, attn_mask = inputs
    ctx.attrs = dict(keyword_only_inputs)
    ctx.save_for_backward(q, k, v, attn_mask)


def _attention_backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    return attention_grads(q, k, v, attn_mask, grad_out, **ctx.attrs)


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def _cached_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.attrs = dict(keyword_only_inputs)
    ctx.save_for_backward(*inputs)


def _cached_backward(ctx, grad_out, grad_key, grad_value):
    q, k, v, past_key, past_value = ctx.saved_tensors
    keys, values = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    if grad_out is None:
        grad_out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    keep = causal_mask(q.shape[2], keys.shape[2]).to(q.device)
    dq, dk, dv, _ = attention_grads(q, keys, values, keep, grad_out, **ctx.attrs)
    if grad_key is not None:
        dk = dk + grad_key
    if grad_value is not None:
        dv = dv + grad_value
    past = past_key.shape[2]
    return dq, dk[:, :, past:], dv[:, :, past:], dk[:, :, :past], dv[:, :, :past]


cached_attention.register_autograd(_cached_backward, setup_context=_cached_setup)
