"""Block-sparse eager attention for static MaskSpecs: work proportional to the kept keys.

Folding a MaskSpec into a dense boolean mask and calling SDPA computes every score and then
throws most away. Here the queries are cut into blocks of rows; each block gathers only the
keys some row of it (in some head) may read and runs SDPA on those, with the mask restricted
to them. For a window that is a band of keys per block; for a row-major 2-D/3-D
neighbourhood, the global tokens plus a contiguous band of grid rows (frames).

Shape glossary (as in rewriter.ir.ops): q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv];
Hs heads of the mask (1 without a per-head table); a block has Bq rows and gathers Nk keys.

A `Plan` (which keys each block reads, and the restricted keep-mask) depends only on the mask,
the lengths, causal and the head count, so it is built once and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rewriter.ir.masks import MaskSpec

# When the block-sparse path beats folding the mask into one SDPA call: measured on the 2-core
# CPU here (2 threads, fp32, D=64, batch 1, torch 2.13; ms per call, folded -> block-sparse
# with 64-row blocks, and the gathered fraction):
#   ViT neighbourhood, 12 heads   14x14 K=7: 1.5 -> 2.1 (0.61)   28x28 K=7: 13.6 -> 11.7 (0.28)
#                                 28x28 K=13: 13.1 -> 16.6 (0.49)  56x56 K=7: 200 -> 64 (0.13)
#                                 56x56 K=13: 179 -> 91 (0.23)
#   causal window + sink 4, 9/3 heads   256 W=64: 1.0 -> 1.6 (0.44)   512 W=64: 3.6 -> 3.4 (0.24)
#                                 512 W=256: 3.7 -> 5.8 (0.47)   1024 W=256: 16.3 -> 13.0 (0.28)
#                                 4096 W=64: 320 -> 34 (0.03)    4096 W=256: 320 -> 59 (0.08)
# Each block is one SDPA call with a fixed cost on top of its work, and a masked call runs at a
# lower rate than the unmasked fused kernel, so the gathered work must be well under the
# whole: the rule is Sq * Sk >= 2^18 and gathered <= 0.35. 64-row blocks were within ~10% of
# 128-row ones everywhere (32 and 256 were slower).
BLOCK = 64  # query rows per block (neighbourhoods: whole grid rows, see `block_bounds`)
MIN_PAIRS = 1 << 18  # Sq * Sk below this: one dense call is cheaper than the block loop
MAX_GATHERED = 0.35  # gathered (block rows x keys read) fraction of Sq * Sk at most


MAX_RANGES = 8  # a block's keys as up to this many contiguous ranges (cat of slices: cheaper
#                 than index_select), else as an index tensor


@dataclass(frozen=True)
class Block:
    start: int  # rows [start, stop)
    stop: int
    keys: tuple[tuple[int, int], ...] | Tensor  # the keys read: [lo, hi) ranges, or [Nk] int64
    #                                             (no key for any row: the block is left out)
    bias: Tensor | None  # [1, Hs, Bq, Nk] additive mask on those keys (0 / -inf, in the query's
    #                      dtype: SDPA then takes its fused path); None: every key kept


@dataclass(frozen=True)
class Plan:
    blocks: tuple[Block, ...]
    gathered: float  # sum of Bq * Nk over blocks, as a fraction of Sq * Sk


@functools.lru_cache(maxsize=64)
def plan(sparsity: str, sq: int, sk: int, num_heads: int, is_causal: bool,
         bounds: tuple[int, ...], device: str = "cpu", dtype: str = "float32") -> Plan:
    """The blocks of ``sparsity`` (ANDed with top-left causal when ``is_causal``); block i
    holds rows [bounds[i], bounds[i + 1])."""
    spec = MaskSpec.parse(sparsity)
    blocks, gathered = [], 0
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        keep = spec.rows(start, stop, sq, sk, num_heads)  # [Hs, Bq, Sk]
        if is_causal:
            rows = torch.arange(start, stop).view(1, -1, 1)
            keep = keep & (torch.arange(sk).view(1, 1, -1) <= rows)
        cols = keep.any(dim=1).any(dim=0).nonzero().flatten()
        if cols.numel() == 0:
            continue  # no key left for any row: zeros, as the reference gives
        sub = keep[:, :, cols]
        bias = None
        if not bool(sub.all()):
            # 4-D: SDPA's fused CPU kernel takes a 4-D mask; a 3-D one sends it to the slow
            # math path (measured 2.6x slower per block, 64 rows x 324 keys, 1 thread)
            bias = torch.zeros((1, *sub.shape), dtype=getattr(torch, dtype), device=device)
            bias.masked_fill_(~sub.unsqueeze(0).to(device), float("-inf"))
        blocks.append(Block(start, stop, _ranges(cols, device), bias))
        gathered += (stop - start) * cols.numel()
    return Plan(tuple(blocks), gathered / max(sq * sk, 1))


def _ranges(cols: Tensor, device: str) -> tuple[tuple[int, int], ...] | Tensor:
    """Sorted key indices as [lo, hi) runs, or as an index tensor when there are many."""
    breaks = (cols[1:] != cols[:-1] + 1).nonzero().flatten() + 1
    if len(breaks) >= MAX_RANGES:
        return cols.to(device)
    edges = [0, *breaks.tolist(), len(cols)]
    return tuple((int(cols[a]), int(cols[b - 1]) + 1) for a, b in zip(edges[:-1], edges[1:],
                                                                       strict=True))


def block_bounds(sparsity: str, sq: int, sk: int, block: int | None = None
                 ) -> tuple[int, ...]:
    """Row boundaries of the blocks: every ``block`` (default BLOCK) rows. A neighbourhood's
    blocks follow the grid instead: the global queries on their own (they read every key),
    then whole grid rows, as many as fit in ``block`` (at least one), so each block reads the
    globals and a band of whole grid rows."""
    spec = MaskSpec.parse(sparsity)
    block = block or BLOCK
    if spec.neighborhood is None:
        return (*range(0, sq, block), sq)
    width = spec.grid[-1]
    step = width * max(1, block // width)
    offset = sk - sq  # query row i sits at position i + offset
    first = min(max(spec.globals_ - offset, 0), sq)  # rows [0, first) are global queries
    aligned = first if first else (spec.globals_ - offset) % width  # first whole grid row
    starts = {0, first, *range(aligned, sq, step)}
    return (*sorted(x for x in starts if x < sq), sq)


def worthwhile(sparsity: str, sq: int, sk: int, num_heads: int, is_causal: bool) -> bool:
    """Whether `attention` (block-sparse) should run instead of one masked SDPA call."""
    if sq * sk < MIN_PAIRS:
        return False
    bounds = block_bounds(sparsity, sq, sk)  # (the same cache entry as fp32 CPU calls)
    gathered = plan(sparsity, sq, sk, num_heads, is_causal, bounds, "cpu", "float32").gathered
    return gathered <= MAX_GATHERED


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, scale: float,
              is_causal: bool, sparsity: str, block: int | None = None) -> Tensor:
    """rewriter::attention (no softcap) with a static ``sparsity``, block by block: equal to
    the reference to fp32 rounding. attn_mask: bool or additive float (in q's dtype),
    broadcastable to [B, Hq, Sq, Sk]; is_causal top-left, the MaskSpec bottom-right."""
    sq, sk = q.shape[-2], k.shape[-2]
    bounds = block_bounds(sparsity, sq, sk, block)
    p = plan(sparsity, sq, sk, q.shape[1], is_causal, bounds, str(q.device),
             str(q.dtype).removeprefix("torch."))
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    for blk in p.blocks:
        kk, vv = _gather(k, blk.keys, 2), _gather(v, blk.keys, 2)
        mask = _restrict(attn_mask, blk)
        res = F.scaled_dot_product_attention(q[:, :, blk.start:blk.stop], kk, vv,
                                             attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[:, :, blk.start:blk.stop] = res if mask is None else torch.nan_to_num(res, nan=0.0)
    return out


def _gather(x: Tensor, keys, dim: int) -> Tensor:
    if torch.is_tensor(keys):
        return x.index_select(dim, keys)
    if len(keys) == 1:
        return x.narrow(dim, keys[0][0], keys[0][1] - keys[0][0])  # a view, no copy
    return torch.cat([x.narrow(dim, lo, hi - lo) for lo, hi in keys], dim=dim)


def _restrict(attn_mask: Tensor | None, blk: Block) -> Tensor | None:
    """The model's 4-D mask on the block's rows and keys (broadcast axes stay size 1),
    combined with the block's bias [1, Hs, Bq, Nk] into one mask."""
    if attn_mask is None:
        return blk.bias
    m = attn_mask
    if m.shape[-2] > 1:
        m = m[:, :, blk.start:blk.stop]
    if m.shape[-1] > 1:
        m = _gather(m, blk.keys, 3)
    if blk.bias is None:
        return m
    if m.dtype == torch.bool:
        return torch.where(m, blk.bias, float("-inf"))
    return m + blk.bias
