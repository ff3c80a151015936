"""Calling a generated kernel: specialization, tile sizes, strides and the launch grid.

Shape glossary: B batch, Hq / Hkv query / key-value heads, G = Hq // Hkv, Sq queries, Sk keys,
D head dim of q and k, Dv head dim of v.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rewriter.codegen.triton import cache
from rewriter.codegen.triton.spec import (
    KernelSpec,
    head_windows,
    kernel_operands,
    mask_kind,
    mask_view,
)
from rewriter.codegen.triton.template import next_pow2
from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec
from rewriter.ir.topk import TopKSpec, is_topk


def tile_sizes(spec: KernelSpec, sq: int, sk: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): rows cover P packed heads x QB queries; small
    inputs (decode, tests) get small tiles so padded rows do not dominate."""
    rows = sq * spec.heads_per_tile
    block_m = min(128, max(16, next_pow2(rows)))
    block_n = min(64, max(16, next_pow2(sk)))
    wide = max(spec.head_dim, spec.v_head_dim) > 64
    if wide and spec.dtype == "fp32":
        block_n = min(block_n, 32)  # fp32 K/V tiles of D=128 would not fit shared memory
    num_warps = 8 if wide and block_m >= 128 else 4
    return block_m, block_n, num_warps, 2 if wide else 3


@functools.lru_cache(maxsize=64)
def _window_table(sparsity: str, num_heads: int, device: str) -> Tensor:
    return torch.tensor(head_windows(sparsity, num_heads), dtype=torch.int32, device=device)


def kernel_spec(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, is_causal: bool,
                sparsity: str, softcap: float, alibi=None) -> KernelSpec:
    return KernelSpec.create(head_dim=q.shape[-1], v_head_dim=v.shape[-1],
                             group=q.shape[1] // k.shape[1], dtype=q.dtype, causal=is_causal,
                             softcap=softcap, mask=mask_kind(attn_mask), sparsity=sparsity,
                             alibi=bool(alibi))


def triton_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                     scale: float, is_causal: bool = False, sparsity: str = "",
                     softcap: float = 0.0, alibi=None, block_m: int | None = None,
                     block_n: int | None = None) -> Tensor:
    """rewriter::attention through the generated kernel (forward only). q [B, Hq, Sq, D],
    k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv]. Raises SpecError for what the
    generator does not serve (see `KernelSpec.create`)."""
    if is_topk(sparsity):  # a dynamic selection: its own kernel (rewriter.codegen.triton.topk)
        from rewriter.codegen.triton.topk import topk_triton_attention

        if softcap > 0:
            raise SpecError("topk with softcap: the Triton kernel has none")
        if alibi:
            raise SpecError("topk with ALiBi: the top-k kernel has no position bias")
        return topk_triton_attention(q, k, v, attn_mask, scale=scale,
                                     spec=TopKSpec.parse(sparsity), is_causal=is_causal)
    spec = kernel_spec(q, k, v, attn_mask, is_causal=is_causal, sparsity=sparsity,
                       softcap=softcap, alibi=alibi)
    if alibi and len(alibi) != q.shape[1]:
        raise SpecError(f"{len(alibi)} ALiBi slopes for {q.shape[1]} query heads")
    if spec.neighborhood is not None:
        MaskSpec.parse(sparsity).rows(0, 0, q.shape[2], k.shape[2])  # token count check
    kernel = cache.load(spec)
    q, k, v, out = kernel_operands(q, k, v)
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return out
    bm, bn, num_warps, num_stages = tile_sizes(spec, sq, sk)
    bm, bn = block_m or bm, block_n or bn
    extra: list = []
    if attn_mask is not None:
        mask = mask_view(attn_mask, (b, hq, sq, sk))
        extra += [mask, *mask.stride()]
    if spec.per_head:
        extra.append(_window_table(sparsity, hq, str(q.device)))
    if spec.alibi:
        extra.append(torch.tensor([float(a) for a in alibi], dtype=torch.float32,
                                  device=q.device))
    grid = (-(-sq // (bm // spec.heads_per_tile)), b * hkv * (spec.group // spec.heads_per_tile))
    kernel[grid](
        q, k, v, out, *extra,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        sq, sk, hkv, float(scale), float(softcap),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages,
    )
    return out
