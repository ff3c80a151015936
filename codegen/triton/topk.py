"""Triton kernel for dynamic top-k block sparsity (``sparsity="topk=..."``, rewriter.ir.topk).

The selection runs first, in PyTorch (it is 1/B of the score matrix): per query block and KV
head, the list of key blocks to read, ascending, padded with -1, and whether each was selected
(read in full once causal) or is a sink/local block (the element predicate decides). The kernel
then visits only the listed tiles: a program owns one query block of one query head, so its
tile is the query block itself (BLOCK_M = BLOCK_N = B, a power of two >= 16).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> out [B, Hq, Sq, Dv]
    lists, picked: [B, Hkv, nQ, M] int32 (block index, -1 = none), int8 (1 = selected)

Served: attn_mask none, bool or additive float (read through the strides of its
[B, Hq, Sq, Sk] broadcast view), no softcap, fp32/fp16/bf16, head dims <= 256; is_causal
(top-left) on top of top-k's own bottom-right causality. Anything else raises SpecError and the op
falls back to the eager path. Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rewriter.codegen.triton.spec import kernel_operands, mask_view
from rewriter.codegen.triton.template import block_dim
from rewriter.errors import SpecError
from rewriter.ir.topk import TopKSpec

MAX_HEAD_DIM = 256


def check(spec: TopKSpec, *, dtype: torch.dtype, head_dim: int, v_head_dim: int,
          mask: str, softcap: float) -> None:  # noqa: ARG001  (every mask kind is served)
    """Raises SpecError (the reason) for a call this kernel does not serve."""
    if spec.block < 16 or spec.block & (spec.block - 1):
        raise SpecError(f"topk block={spec.block}: the Triton kernel takes a power of two >= 16")
    if softcap > 0:
        raise SpecError("topk with softcap: the Triton kernel has none")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SpecError(f"dtype {dtype} (supported: fp32, fp16, bf16)")
    if max(head_dim, v_head_dim) > MAX_HEAD_DIM:
        raise SpecError(f"head dim {max(head_dim, v_head_dim)} > {MAX_HEAD_DIM}")


def block_lists(spec: TopKSpec, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(lists [B, Hkv, nQ, M] int32, picked [B, Hkv, nQ, M] int8): per query block and KV
    head, the key blocks to visit (selected, sink and local-band blocks, each once,
    ascending; -1 pads) and which of them were selected."""
    sq, sk, size = q.shape[2], k.shape[2], spec.block
    first, nq = spec.query_blocks(sq, sk)
    nk = -(-sk // size)
    sel = spec.selected(q, k)  # [B, Hkv, nQ, nK]
    qb = torch.arange(first, first + nq, device=q.device).view(-1, 1)
    kb = torch.arange(nk, device=q.device).view(1, -1)
    lo_pos = torch.clamp(qb * size, min=sk - sq)  # first and last query position in the call
    hi_pos = torch.clamp(qb * size + size - 1, max=sk - 1)
    band = (kb * size <= hi_pos) & ((kb + 1) * size - 1 > lo_pos - spec.local)
    static = ((kb * size < spec.sink) | band) & (kb <= qb)  # [nQ, nK]
    need = sel | static
    count = max(int(need.sum(-1).max()), 1)
    order = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)[..., :count]
    valid = torch.arange(count, device=q.device) < need.sum(-1, keepdim=True)
    lists = torch.where(valid, order, -1).to(torch.int32)
    picked = (sel.gather(-1, order) & valid).to(torch.int8)
    return lists.contiguous(), picked.contiguous()


@triton.jit
def _topk_attn_fwd(
    Q, K, V, Out, Lists, Picked, Mask, stride_mb, stride_mh, stride_ms, stride_mk,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_lq,
    Sq, Sk, H, H_KV, n_lists, first_block, scale,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
    CAUSAL_TOP_LEFT: tl.constexpr, FP32: tl.constexpr, MASK: tl.constexpr,
):
    """One program: query block pid_q (in the call) of query head pid_bh % H, batch
    pid_bh // H. Visits the key blocks of its (batch, KV head, query block) list. MASK: 0 no
    attn_mask, 1 bool (nonzero = attend), 2 additive float."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    head = pid_bh % H
    kvh = head // (H // H_KV)
    offset = Sk - Sq
    rows = tl.arange(0, BLOCK)
    pos = (first_block + pid_q) * BLOCK + rows  # query positions
    q_idx = pos - offset
    row_ok = (q_idx >= 0) & (q_idx < Sq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + head * stride_qh + q_idx[:, None] * stride_qs
                + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                other=0.0)
    lists = Lists + b * stride_lb + kvh * stride_lh + pid_q * stride_lq
    picks = Picked + b * stride_lb + kvh * stride_lh + pid_q * stride_lq
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    for i in range(0, n_lists):
        kb = tl.load(lists + i)
        if kb >= 0:
            chosen = tl.load(picks + i) != 0
            offs_n = kb * BLOCK + tl.arange(0, BLOCK)
            in_range = offs_n < Sk
            k_t = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_ks
                          + offs_d[:, None],
                          mask=in_range[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            if FP32:
                s = tl.dot(q, k_t, input_precision="ieee") * scale
            else:
                s = tl.dot(q, k_t) * scale
            dist = pos[:, None] - offs_n[None, :]
            keep = in_range[None, :] & row_ok[:, None] & (dist >= 0) & (
                chosen | (dist < LOCAL) | (offs_n[None, :] < SINK))
            if CAUSAL_TOP_LEFT:
                keep &= offs_n[None, :] <= q_idx[:, None]
            if MASK != 0:
                m = tl.load(Mask + b * stride_mb + head * stride_mh + q_idx[:, None] * stride_ms
                            + offs_n[None, :] * stride_mk,
                            mask=row_ok[:, None] & in_range[None, :], other=0)
                if MASK == 1:
                    keep &= m != 0
                else:
                    s = s + m.to(tl.float32)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs
                        + offs_dv[None, :],
                        mask=in_range[:, None] & (offs_dv[None, :] < V_HEAD_DIM), other=0.0)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no key gives zeros
    tl.store(Out + b * stride_ob + head * stride_oh + q_idx[:, None] * stride_os
             + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < V_HEAD_DIM))


def topk_triton_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                          scale: float, spec: TopKSpec, is_causal: bool = False) -> Tensor:
    """rewriter::attention with ``sparsity=spec.format()``, by the kernel."""
    check(spec, dtype=q.dtype, head_dim=q.shape[-1], v_head_dim=v.shape[-1], mask="none",
          softcap=0.0)
    q, k, v, out = kernel_operands(q, k, v)
    bt, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return out
    lists, picked = block_lists(spec, q, k)
    first, nq = spec.query_blocks(sq, sk)
    kind, mask, strides = 0, out, (0, 0, 0, 0)  # (Mask is never read without an attn_mask)
    if attn_mask is not None:
        kind = 1 if attn_mask.dtype == torch.bool else 2
        mask = mask_view(attn_mask, (bt, hq, sq, sk))
        strides = mask.stride()
    _topk_attn_fwd[(nq, bt * hq)](
        q, k, v, out, lists, picked, mask, *strides,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lists.stride(0), lists.stride(1), lists.stride(2),
        sq, sk, hq, hkv, lists.shape[-1], first, float(scale),
        HEAD_DIM=q.shape[-1], V_HEAD_DIM=v.shape[-1], BLOCK_D=block_dim(q.shape[-1]),
        BLOCK_DV=block_dim(v.shape[-1]), BLOCK=spec.block, SINK=spec.sink, LOCAL=spec.local,
        CAUSAL_TOP_LEFT=bool(is_causal) and sq < sk, FP32=q.dtype == torch.float32,
        MASK=kind,
    )
    return out
