"""Dynamic top-k block sparsity: the ``sparsity`` attribute ``topk=K,...`` of
``rewriter.attention`` (Quest / Double Sparsity / FlexPrefill style, training-free).

Unlike a `MaskSpec`, the keys kept depend on the content of q and k. Positions are absolute and
bottom-right aligned as in rewriter.ir.masks: with Sq queries over Sk keys, query i sits at
position p_i = i + Sk - Sq. Positions are cut into blocks of B: query block ``p // B``, key
block ``j // B``. The mask is causal by definition (topk serves causal self-attention).

For each query block present in the call and each KV head g::

    q_bar   mean of the block's queries over its rows and over g's query heads   [D]
    score   estimate=mean        q_bar . mean of the key block's keys
            estimate=channels:C  max over the block's keys j of sum over the C channels of
                                 largest |q_bar| of q_bar[c] * k_j[c]  (a few channels stand
                                 in for the full dot product, as Double Sparsity's label
                                 channels; picked per query block here, without calibration)
    eligible  key blocks kb <= the query block, except those every row of it keeps anyway
              (wholly inside the sink, or inside the local band of the block's last row)
    Sel     the K eligible key blocks with the highest score (all of them when fewer)

    keep(i, j) = j <= p_i and (j < sink or p_i - j < local or block(j) in Sel(block(p_i), g))

The selection is a function of the rows present in one call: a decoder step (one query)
selects for itself, so prefill + steps need not equal one forward over the whole text.

String form: ``topk=K,block=B,sink=S,local=W,estimate=mean|channels:C`` (all keys written).

Shape glossary: B batch (Bt where it could be confused with the block size), Hq query heads,
Hkv KV heads, G = Hq // Hkv, Sq queries, Sk keys, D head dim, nQ query blocks in the call,
nK key blocks, K blocks selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec
from rewriter.ir.specs import attribute_int, attribute_items

_KEYS = ("topk", "block", "sink", "local", "estimate")


@dataclass(frozen=True)
class TopKSpec:
    topk: int
    block: int = 64
    sink: int = 4
    local: int = 64
    estimate: str = "mean"  # "mean" or "channels:C"

    def __post_init__(self):
        if self.topk < 1:
            raise SpecError(f"topk={self.topk}: must be a positive integer (key blocks)")
        if self.block < 1:
            raise SpecError(f"topk block={self.block}: must be a positive integer (tokens)")
        if self.sink < 0 or self.local < 0:
            raise SpecError("topk sink= and local= must be integers >= 0 (tokens)")
        if self.estimate != "mean":
            kind, _, count = self.estimate.partition(":")
            if kind != "channels" or not count.isdigit() or int(count) < 1:
                raise SpecError(f"topk estimate={self.estimate!r}: mean or channels:C "
                                "(C a positive number of channels)")

    is_dense = False  # (as MaskSpec.is_dense: consumers of either kind ask)

    @property
    def channels(self) -> int | None:
        return int(self.estimate.partition(":")[2]) if self.estimate != "mean" else None

    @classmethod
    def parse(cls, text: str) -> TopKSpec:
        values: dict = {key: value if key == "estimate"
                         else attribute_int(text, key, value, "topk spec")
                         for key, value in attribute_items(text, _KEYS, "topk spec")}
        if "topk" not in values:
            raise SpecError(f"topk spec {text!r}: needs topk=K")
        return cls(**values)

    def format(self) -> str:
        return (f"topk={self.topk},block={self.block},sink={self.sink},local={self.local},"
                f"estimate={self.estimate}")

    def __str__(self) -> str:
        return self.format()

    # --- selection -------------------------------------------------------------------------

    def query_blocks(self, sq: int, sk: int) -> tuple[int, int]:
        """(first query block, nQ) of a call with Sq queries over Sk keys."""
        first = (sk - sq) // self.block
        return first, (sk - 1) // self.block - first + 1

    def eligible(self, sq: int, sk: int, device=None) -> Tensor:
        """[nQ, nK] bool: key blocks a query block may select."""
        first, nq = self.query_blocks(sq, sk)
        nk = -(-sk // self.block)
        qb = torch.arange(first, first + nq, device=device).view(-1, 1)
        kb = torch.arange(nk, device=device).view(1, -1)
        last_row = torch.clamp(qb * self.block + self.block - 1, max=sk - 1)
        in_sink = (kb + 1) * self.block <= self.sink
        in_local = last_row - kb * self.block < self.local
        return (kb <= qb) & ~in_sink & ~in_local

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """[B, Hkv, nQ, nK] fp32 estimates of each query block's affinity to each key block."""
        bt, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        first, nq = self.query_blocks(sq, sk)
        nk = -(-sk // self.block)
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 stays
        # query rows sit at positions offset.. : pad in front to the first block's start
        front = (sk - sq) - first * self.block
        q_bar = _block_means(q.to(acc), nq, self.block, front)  # [B, Hq, nQ, D]
        q_bar = q_bar.view(bt, hkv, hq // hkv, nq, d).mean(2)  # [B, Hkv, nQ, D]
        kf = k.to(acc)
        if self.channels is None:
            return q_bar @ _block_means(kf, nk, self.block).transpose(-1, -2)
        c = min(self.channels, d)
        picked = q_bar.abs().topk(c, dim=-1).indices
        u = torch.zeros_like(q_bar).scatter(-1, picked, q_bar.gather(-1, picked))
        approx = u @ kf.transpose(-1, -2)  # [B, Hkv, nQ, Sk]
        pad = nk * self.block - sk
        approx = torch.nn.functional.pad(approx, (0, pad), value=float("-inf"))
        return approx.view(bt, hkv, nq, nk, self.block).amax(-1)

    def selected(self, q: Tensor, k: Tensor) -> Tensor:
        """[B, Hkv, nQ, nK] bool: the key blocks each query block and KV head selected."""
        sq, sk = q.shape[2], k.shape[2]
        eligible = self.eligible(sq, sk, q.device)
        s = self.scores(q, k).masked_fill(~eligible, float("-inf"))
        picked = s.topk(min(self.topk, s.shape[-1]), dim=-1).indices
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter(-1, picked, True)
        return chosen & eligible  # fewer eligible blocks than K: the -inf picks drop out

    def static_keep(self, sq: int, sk: int, device=None) -> Tensor:
        """[Sq, Sk] bool: causal and (sink or local), what every head keeps."""
        p = torch.arange(sq, device=device).view(-1, 1) + (sk - sq)
        j = torch.arange(sk, device=device).view(1, -1)
        return (j <= p) & ((j < self.sink) | (p - j < self.local))

    def keep(self, q: Tensor, k: Tensor) -> Tensor:
        """[B, Hq, Sq, Sk] bool keep-mask (the naive definition: every element)."""
        sq, sk = q.shape[2], k.shape[2]
        first, _ = self.query_blocks(sq, sk)
        sel = self.selected(q, k)  # [B, Hkv, nQ, nK]
        row_block = (torch.arange(sq, device=q.device) + sk - sq) // self.block - first
        key_block = torch.arange(sk, device=q.device) // self.block
        tokens = sel[:, :, row_block][..., key_block]  # [B, Hkv, Sq, Sk]
        p = torch.arange(sq, device=q.device).view(-1, 1) + (sk - sq)
        causal = torch.arange(sk, device=q.device).view(1, -1) <= p
        keep = self.static_keep(sq, sk, q.device) | (tokens & causal)
        return keep.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    def density(self, q: Tensor, k: Tensor) -> float:
        """Kept fraction of the causal score matrix for these q, k."""
        sq, sk = q.shape[2], k.shape[2]
        p = torch.arange(sq).view(-1, 1) + (sk - sq)
        causal = (torch.arange(sk).view(1, -1) <= p).to(q.device)
        return float(self.keep(q, k).sum() / (causal.sum() * q.shape[0] * q.shape[1]))


def _block_means(x: Tensor, blocks: int, size: int, front: int = 0) -> Tensor:
    """[B, H, S, D] -> [B, H, blocks, D]: means over consecutive runs of ``size`` rows, the
    first run starting ``front`` rows before row 0 (padding rows do not count)."""
    back = blocks * size - front - x.shape[2]
    padded = torch.nn.functional.pad(x, (0, 0, front, back))
    sums = padded.unflatten(2, (blocks, size)).sum(3)
    counts = torch.full((blocks,), float(size), dtype=x.dtype, device=x.device)
    counts[0] -= front
    counts[-1] -= back
    return sums / counts.view(-1, 1)


def _blocks(x: Tensor, blocks: int, size: int) -> Tensor:
    """[B, H, S, D] zero-padded to blocks * size positions, as [B, H, blocks, size, D]."""
    pad = blocks * size - x.shape[2]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (blocks, size))


def is_topk(sparsity: str) -> bool:
    return sparsity.startswith("topk=")


def parse_sparsity(sparsity: str):
    """A ``sparsity`` string as a TopKSpec, or a static MaskSpec."""
    return TopKSpec.parse(sparsity) if is_topk(sparsity) else MaskSpec.parse(sparsity)


# --- execution that skips the blocks not kept -----------------------------------------------


def topk_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *,
                   scale: float, spec: TopKSpec) -> Tensor:
    """Attention under ``spec`` computing only the kept key blocks. Per query block, each KV
    head gathers its own blocks (sink, local band, selected; each once, padded to the most
    any head keeps) and SDPA runs on them with the element mask. Equals attention with
    ``spec.keep`` to fp32 rounding; ``attn_mask`` (bool or additive, broadcast to
    [B, Hq, Sq, Sk]) is ANDed in."""
    bt, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group, size = hq // hkv, spec.block
    offset = sk - sq
    first, nq = spec.query_blocks(sq, sk)
    nk = -(-sk // size)
    sel = spec.selected(q, k)  # [B, Hkv, nQ, nK]
    kb = torch.arange(nk, device=q.device)
    within = torch.arange(size, device=q.device)
    # K/V as whole blocks [B, Hkv, nK, size, D]: a query block copies the blocks it reads
    k_blocks, v_blocks = _blocks(k, nk, size), _blocks(v, nk, size)
    batch_ix = torch.arange(bt, device=q.device).view(-1, 1, 1)
    head_ix = torch.arange(hkv, device=q.device).view(1, -1, 1)
    out = q.new_empty((bt, hq, sq, dv))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(bt, hq, sq, sk)
    # rows can be left with no key only without a local band (or under the model's mask)
    may_empty = spec.local == 0 or attn_mask is not None
    for b in range(nq):
        block = first + b
        lo, hi = max(0, block * size - offset), min(sq, (block + 1) * size - offset)
        p = (torch.arange(lo, hi, device=q.device) + offset).view(-1, 1)  # [rows, 1]
        band = (kb * size <= hi - 1 + offset) & ((kb + 1) * size - 1 > lo + offset - spec.local)
        static = (kb * size < spec.sink) | band  # [nK]: blocks every head reads
        chosen = sel[:, :, b]  # [B, Hkv, nK]
        need = (chosen | static) & (kb <= block)
        kept = need.sum(-1, keepdim=True)
        count = int(kept.max())
        order = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)[..., :count]
        pos = (order.unsqueeze(-1) * size + within).flatten(2)  # [B, Hkv, L] key positions
        real = (torch.arange(count, device=q.device) < kept).repeat_interleave(size, -1) \
            & (pos < sk)
        # per key: kept whatever the row (a selected block, the sink) once causal
        anyway = chosen.gather(-1, order).repeat_interleave(size, dim=-1) | (pos < spec.sink)
        dist = p - pos.unsqueeze(2)  # [B, Hkv, rows, L]
        mask = (dist >= 0) & ((dist < spec.local) | anyway.unsqueeze(2)) & real.unsqueeze(2)
        mask = mask.repeat_interleave(group, dim=1)  # [B, Hq, rows, L]
        if attn_mask is not None:
            index = pos.clamp_max(sk - 1).repeat_interleave(group, dim=1).unsqueeze(2)
            model = attn_mask[:, :, lo:hi].gather(-1, index.expand(-1, -1, hi - lo, -1))
            if model.dtype == torch.bool:
                mask = mask & model
            else:
                mask = model.to(q.dtype).masked_fill(~mask, float("-inf"))
        keys = k_blocks[batch_ix, head_ix, order].flatten(2, 3)  # [B, Hkv, L, D]
        values = v_blocks[batch_ix, head_ix, order].flatten(2, 3)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, lo:hi], keys, values, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[:, :, lo:hi] = torch.nan_to_num(o, nan=0.0) if may_empty else o
    return out
