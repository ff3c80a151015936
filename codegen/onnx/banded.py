"""Banded attention for causal self-attention with a static sink + window MaskSpec: work and
memory O(S * (sink + W + Bq)), never O(S^2) (traced onnxscript, standard ONNX ops only, so
both targets run it).

The queries are padded up to nb = ceil(S / Bq) blocks of Bq rows. Query block i (rows
i*Bq .. i*Bq + Bq - 1) may read the sink keys [0, sink) and the band [i*Bq - W + 1, i*Bq + Bq):
Nk = sink + W - 1 + Bq key slots, gathered from K/V by an in-graph index table [nb, Nk] (clamped
into range; band slots below the sink, or below 0, are masked, so no key counts twice). The
keep-mask [nb, Bq, Nk] (causal, window, dilation, sink) comes from the positions; the model's
own mask, if the site has one, is gathered onto the same slots (one Gather on it flattened:
O(S * Nk) reads), so the result is exact for whatever mask the site carries. Then MatMul /
Softmax / MatMul on 6-D tensors, GQA without repeating K/V: q is viewed as
[B, Hkv, G, nb, Bq, D] against keys [B, Hkv, 1, nb, Nk, D] (head
h = kv * G + g, as in `translate.decomposed`).

Shape glossary (as in rewriter.ir.ops): q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv],
G = Hq // Hkv, Sp = nb * Bq the padded length; the model's mask [Bm, Hm, Rm, Cm] with
Bm in {1, B}, Hm in {1, Hq}, Rm and Cm in {1, S}.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset23 as op

from rewriter.codegen.onnx.masks import NEG_INF, const, dim, to_4d, zero_nan
from rewriter.ir.masks import MaskSpec

# Query rows per block. Measured: SmolLM2-135M prefill, batch 1, ONNX Runtime 1.32 CPU, 2
# threads, target "ort", median ms of 5 interleaved runs (a shared, noisy 2-core machine):
#   window=256,sink=4   64-row blocks 2048: 6983   4096: 5758 (quiet)  128-row: 7041, 5873
#                       512 tokens: banded 1911, dense-mask path 1975 (no If on S is needed)
#   window=256 (plain)  banded 2048: 6858  4096: 5679; GroupQueryAttention local_window_size
#                       10011, 11741 (its CPU kernel computes the causal scores); 512: 1883 vs
#                       1812, so "ort" takes the band for plain windows too
BLOCK = 64


def fits(spec, num_heads: int) -> bool:
    """Whether ``spec`` is a static sink + window mask with a window for every head (one for
    all, or per head from a table without full heads)."""
    return isinstance(spec, MaskSpec) and spec.window is not None \
        and spec.neighborhood is None and min(spec.window_list(num_heads)) > 0


def keys_read(spec: MaskSpec, num_heads: int, block: int | None = None) -> int:
    """Nk: the key slots one query block reads (W: the widest head's window)."""
    return spec.sink + max(spec.window_list(num_heads)) - 1 + (block or BLOCK)


def mask_fits(mask_shape, hq: int) -> bool:
    """Whether the site's own mask (a torch shape, or None) is one `banded` can gather:
    rank <= 4, heads 1 or Hq (rows and keys may be broadcast)."""
    if mask_shape is None:
        return True
    return len(mask_shape) <= 4 and (len(mask_shape) < 3 or str(mask_shape[-3]) in ("1",
                                                                                 str(hq)))


def banded(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap,
           block: int | None = None):
    """rewriter::attention of a causal self-attention site (Sq == Sk: top-left causal is the
    MaskSpec's bottom-right) with a sink + window ``spec``."""
    del is_causal  # the plan checked the site is causal; the band applies causality itself
    hq, hkv = q.shape[1], k.shape[1]
    block = block or BLOCK
    nk = keys_read(spec, hq, block)
    s_len = dim(q, 2)  # scalar int64 S
    nb = op.Div(op.Add(s_len, const(block - 1)), const(block))  # ceil(S / Bq)
    pad = op.Sub(op.Mul(nb, const(block)), s_len)  # Sp - S
    slot, key_pos, q_pos = _positions(spec, nb, block, nk)
    index = op.Min(op.Max(key_pos, const(0)), op.Sub(s_len, const(1)))  # [nb, Nk], in range
    # [nb, Bq, Nk], or [Hkv, G|1, nb, Bq, Nk] with per-head windows
    keep = _keep(spec, slot, op.Unsqueeze(key_pos, const([1])), q_pos, hq, hkv)

    # q [B, Hq, S, D] -> [B, Hkv, G, nb, Bq, D], scaled (Sp*D multiplies, not Sp*Nk)
    qs = op.Mul(q, op.CastLike(const(scale, np.float32), q))
    qs = op.Pad(qs, _pad_rows(pad))
    qs = op.Reshape(qs, const([0, hkv, hq // hkv, -1, block, q.shape[3]]))
    # k [B, Hkv, S, D] -> [B, Hkv, nb, Nk, D] -> [B, Hkv, 1, nb, D, Nk]; v -> [.., nb, Nk, Dv]
    kb = op.Unsqueeze(op.Transpose(op.Gather(k, index, axis=2), perm=[0, 1, 2, 4, 3]),
                      const([2]))
    vb = op.Unsqueeze(op.Gather(v, index, axis=2), const([2]))
    s = op.MatMul(qs, kb)  # [B, Hkv, G, nb, Bq, Nk]
    if softcap > 0:
        cap = op.CastLike(const(softcap, np.float32), s)
        s = op.Mul(op.Tanh(op.Div(s, cap)), cap)
    rows = op.Min(q_pos, op.Sub(s_len, const(1)))  # [nb, Bq, 1]: padded rows read row S-1
    s = op.Add(s, _bias(attn_mask, keep, index, rows, s_len, hq, hkv, s))
    out = op.MatMul(op.Softmax(s, axis=-1), vb)  # [B, Hkv, G, nb, Bq, Dv]
    if attn_mask is not None:  # a row the model's mask empties is NaN (without one, every
        out = zero_nan(out)  # real row keeps its own key; padded rows are dropped below)
    out = op.Reshape(out, const([0, hq, -1, v.shape[3]]))  # [B, Hq, Sp, Dv]
    return op.Slice(out, const([0]), op.Unsqueeze(s_len, const([0])), const([2]))


def _pad_rows(pad):
    """Pad's pads input: ``pad`` rows at the end of axis 2 of a 4-D tensor."""
    return op.Concat(const([0, 0, 0, 0, 0, 0]), op.Unsqueeze(pad, const([0])), const([0]),
                     axis=0)


def _positions(spec: MaskSpec, nb, block: int, nk: int):
    """(slot numbers [1, Nk], key positions [nb, Nk] (unclamped), query positions
    [nb, Bq, 1]). Slots [0, sink) are the sink keys; slot sink + j is key start - W + 1 + j."""
    one = const(1)
    starts = op.Unsqueeze(op.Mul(op.Range(const(0), nb, one), const(block)), const([1]))
    slot = op.Unsqueeze(op.Range(const(0), const(nk), one), const([0]))  # [1, Nk]
    key_pos = op.Add(starts, op.Sub(slot, const(nk - block)))  # nk - Bq = sink + W - 1
    if spec.sink:
        key_pos = op.Where(op.Less(slot, const(spec.sink)), slot, key_pos)
    rows = op.Unsqueeze(op.Range(const(0), const(block), one), const([0, 2]))  # [1, Bq, 1]
    return slot, key_pos, op.Add(op.Unsqueeze(starts, const([2])), rows)


def _keep(spec: MaskSpec, slot, key_pos, q_pos, hq: int, hkv: int):
    """[nb, Bq, Nk] bool: causal, and inside the window (on the dilation) or a sink slot.
    Band slots below the sink (or below 0) are dropped: those keys are sink slots already.
    With per-head windows: [Hkv, G, nb, Bq, Nk] (G -> 1 when a KV head's query heads share
    their window), to broadcast against the scores [B, Hkv, G, nb, Bq, Nk]."""
    dist = op.Sub(q_pos, key_pos)  # [nb, Bq, Nk]
    causal = op.GreaterOrEqual(dist, const(0))
    near = op.And(causal, op.Less(dist, _windows(spec, hq, hkv)))
    if spec.dilation > 1:
        near = op.And(near, op.Equal(op.Mod(dist, const(spec.dilation)), const(0)))
    near = op.And(near, op.GreaterOrEqual(key_pos, const(spec.sink)))
    if not spec.sink:
        return near
    return op.Or(near, op.And(causal, op.Unsqueeze(op.Less(slot, const(spec.sink)),
                                                   const([0]))))


def _windows(spec: MaskSpec, hq: int, hkv: int):
    """The window as a constant: a scalar, or [Hkv, G|1, 1, 1, 1] per head."""
    windows = spec.window_list(hq)
    if len(set(windows)) == 1:
        return const(windows[0])
    table = np.array(windows, dtype=np.int64).reshape(hkv, hq // hkv)
    if (table == table[:, :1]).all():
        table = table[:, :1]
    return const(table.reshape(*table.shape, 1, 1, 1))


def _bias(attn_mask, keep, index, rows, s_len, hq: int, hkv: int, like):
    """The additive bias on the scores [B|1, Hkv|1, G|1, nb, Bq, Nk]: -inf off ``keep``, and
    the model's mask gathered onto the key slots."""
    zero = op.CastLike(const(0.0, np.float32), like)
    neg_inf = op.CastLike(const(NEG_INF, np.float32), like)
    if attn_mask is None:
        return op.Where(keep, zero, neg_inf)
    boolean = attn_mask.dtype == ir.DataType.BOOL
    dims = [1] * (4 - len(attn_mask.shape)) + list(attn_mask.shape)
    mask = _gather_mask(to_4d(attn_mask), dims, index, rows, s_len, hq, hkv)
    if boolean:
        return op.Where(op.And(mask, keep), zero, neg_inf)
    return op.Where(keep, op.CastLike(mask, like), neg_inf)


def _gather_mask(mask, dims: list, index, rows, s_len, hq: int, hkv: int):
    """The model's 4-D mask [Bm, Hm, Rm, Cm] (``dims``) on the band's slots: [Bm, Hkv|1,
    G|1, nb|1, Bq|1, Nk|1] (a broadcast axis stays 1). ``index`` [nb, Nk] and ``rows``
    [nb, Bq, 1] are the key and query positions, clamped into [0, S). Reads O(S * Nk)."""
    _, hm, row_len, col_len = dims
    row_wide, col_wide = not _is_one(row_len), not _is_one(col_len)
    if row_wide and col_wide:  # one Gather on the flattened [Bm, Hm, S*S]: no copy of it
        flat = op.Reshape(mask, op.Concat(op.Shape(mask, start=0, end=2), const([-1]),
                                          axis=0))
        where = op.Add(op.Mul(rows, s_len), op.Unsqueeze(index, const([1])))  # [nb, Bq, Nk]
        mask = op.Gather(flat, where, axis=2)  # [Bm, Hm, nb, Bq, Nk]
    elif row_wide:  # [Bm, Hm, S, 1] -> [Bm, Hm, nb, Bq, 1]
        mask = op.Gather(mask, op.Squeeze(rows, const([2])), axis=2)
    elif col_wide:  # [Bm, Hm, 1, S] -> [Bm, Hm, 1, nb, Nk] -> [Bm, Hm, nb, 1, Nk]
        mask = op.Transpose(op.Gather(mask, index, axis=3), perm=[0, 1, 3, 2, 4])
    else:
        mask = op.Unsqueeze(mask, const([2]))  # [Bm, Hm, 1, 1, 1]
    if not _is_one(hm) and hq != hkv:  # per query head: [Bm, Hkv, G, ...]
        return op.Reshape(mask, op.Concat(op.Shape(mask, start=0, end=1),
                                          const([hkv, hq // hkv]),
                                          op.Shape(mask, start=2, end=5), axis=0))
    return op.Unsqueeze(mask, const([2]))


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1
