"""Masks built inside the ONNX graph from the dynamic lengths, so exported shapes stay dynamic.

Traced onnxscript helpers (called while torch.onnx translates a node). Shape glossary:
    Sq queries, Sk keys, Hs heads of a per-head table (1 without one); all masks are 4-D
    [1, Hs, Sq, Sk] bool keep-masks (True = attend) or the model's own mask broadcast to
    [B|1, Hq|1, Sq, Sk].
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset23 as op

from rewriter.ir.masks import MaskSpec

NEG_INF = float("-inf")


def const(value, dtype=np.int64):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def dim(x, axis: int):
    """Scalar int64: x.shape[axis] at run time."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1), const([0]))


def positions(q, k, sk=None):
    """(query positions [Sq, 1] top-left, bottom-right offset Sk - Sq, key positions [1, Sk]).
    ``sk``: the key count as a scalar, when no tensor holds all keys (a cache's past + new)."""
    sq, sk = dim(q, 2), dim(k, 2) if sk is None else sk
    one = const(1)
    q_pos = op.Unsqueeze(op.Range(const(0), sq, one), const([1]))
    k_pos = op.Unsqueeze(op.Range(const(0), sk, one), const([0]))
    return q_pos, op.Sub(sk, sq), k_pos


def cache_positions(q, past_key, past_length, sink: int):
    """(query positions [S, 1], key positions [1, L + S]) of S new tokens over a bounded cache
    of L entries after P = ``past_length`` (scalar int64) tokens
    (rewriter.ir.ops.bounded_cached_attention): queries sit at P..P+S-1; entry j of
    Concat(past, new) holds position j when j < min(sink, L), else P - L + j."""
    one, cached = const(1), dim(past_key, 2)
    q_pos = op.Unsqueeze(op.Range(past_length, op.Add(past_length, dim(q, 2)), one), const([1]))
    j = op.Range(const(0), op.Add(cached, dim(q, 2)), one)
    shifted = op.Add(j, op.Sub(past_length, cached))
    if sink:
        shifted = op.Where(op.Less(j, op.Min(const(sink), cached)), j, shifted)
    return q_pos, op.Unsqueeze(shifted, const([0]))


def causal_keep(q, k):
    """[1, 1, Sq, Sk]: key j visible from query i when j <= i (top-left, as in SDPA)."""
    q_pos, _, k_pos = positions(q, k)
    return op.Unsqueeze(op.LessOrEqual(k_pos, q_pos), const([0, 1]))


def causal_keep_bottom_right(q, k, sk=None):
    """[1, 1, Sq, Sk]: key j visible from query i when j <= i + Sk - Sq (a query after a
    cache of Sk - Sq tokens; rewriter.ir.masks.causal_mask)."""
    q_pos, offset, k_pos = positions(q, k, sk)
    return op.Unsqueeze(op.LessOrEqual(k_pos, op.Add(q_pos, offset)), const([0, 1]))


def sparsity_keep(spec: MaskSpec, q, k, sk=None):
    """[1, Hs, Sq, Sk]: the MaskSpec predicate (rewriter.ir.masks.MaskSpec.mask_mod), bottom-right
    aligned: query i sits at position i + Sk - Sq."""
    q_pos, offset, k_pos = positions(q, k, sk)
    return keep_at(spec, op.Add(q_pos, offset), k_pos, q.shape[1])


def keep_at(spec: MaskSpec, q_pos, k_pos, num_heads: int):
    """[1, Hs, Sq, Sk]: the MaskSpec predicate for queries at the absolute positions ``q_pos``
    [Sq, 1] and keys at ``k_pos`` [1, Sk] (rewriter.ir.masks.MaskSpec.keep_at): a bounded KV
    cache's keys are not 0..Sk-1 once it has evicted some. ``num_heads``: Hq, for a per-head
    table."""
    if spec.neighborhood is not None:
        return _neighborhood_at(spec, q_pos, k_pos)
    dist = op.Unsqueeze(op.Sub(q_pos, k_pos), const([0]))  # [1, Sq, Sk]
    if spec.heads is None:
        window = const(spec.window)
    else:
        windows = spec.head_windows(num_heads).numpy()
        window = const(windows.reshape(-1, 1, 1))  # [Hs, 1, 1]
    keep = op.Less(op.Abs(dist), window)
    if spec.dilation > 1:
        keep = op.And(keep, op.Equal(op.Mod(dist, const(spec.dilation)), const(0)))
    if spec.sink:
        keep = op.Or(keep, op.Unsqueeze(op.Less(k_pos, const(spec.sink)), const([0])))
    if spec.heads is not None:
        keep = op.Or(keep, op.Equal(window, const(0)))  # a full-attention head
    return op.Unsqueeze(keep, const([0]))


def neighborhood_keep(spec: MaskSpec, q, k, sk=None):
    """[1, 1, Sq, Sk]: a grid neighbourhood (rewriter.ir.masks), from the positions: grid
    coordinates by integer Div/Mod (operands >= 0, so truncating Div is floor), the window
    start per axis on the query side [Sq, 1], compared with the key side [1, Sk]."""
    q_pos, offset, k_pos = positions(q, k, sk)
    return _neighborhood_at(spec, op.Add(q_pos, offset), k_pos)


def _neighborhood_at(spec: MaskSpec, q_abs, k_pos):
    """neighborhood_keep for queries at the absolute positions ``q_abs`` [Sq, 1] and keys at
    ``k_pos`` [1, Sk]."""
    n, zero, kernel = const(spec.globals_), const(0), const(spec.neighborhood)
    half, dil = const(spec.neighborhood // 2), const(spec.dilation)
    q_cell = op.Max(op.Sub(q_abs, n), zero)  # grid cells; globals get 0 (overridden below)
    k_cell = op.Max(op.Sub(k_pos, n), zero)
    near = None
    stride = int(np.prod(spec.grid))
    for length in spec.grid:  # outermost axis first (row-major)
        stride //= length
        x = op.Mod(op.Div(q_cell, const(stride)), const(length))  # [Sq, 1]
        y = op.Mod(op.Div(k_cell, const(stride)), const(length))  # [1, Sk]
        if spec.dilation == 1:
            start = op.Max(op.Min(op.Sub(x, half), const(length - spec.neighborhood)), zero)
        else:
            group = op.Mod(x, dil)  # the query's sub-grid and its length on this axis
            sub_len = op.Div(op.Sub(const(length + spec.dilation - 1), group), dil)
            start = op.Max(op.Min(op.Sub(op.Div(x, dil), half), op.Sub(sub_len, kernel)), zero)
            y_group, y = op.Mod(y, dil), op.Div(y, dil)
        axis = op.And(op.GreaterOrEqual(y, start), op.Less(y, op.Add(start, kernel)))
        if spec.dilation > 1:
            axis = op.And(axis, op.Equal(y_group, group))
        near = axis if near is None else op.And(near, axis)
    if spec.globals_:
        near = op.Or(near, op.Or(op.Less(q_abs, n), op.Less(k_pos, n)))
    return op.Unsqueeze(near, const([0, 1]))


def to_4d(mask):
    """Leading unit axes up to rank 4 (models pass [Sq, Sk] or [B, Sq, Sk] masks too). Values
    built here have no recorded shape; they are 4-D by construction."""
    if mask.shape is None or len(mask.shape) >= 4:
        return mask
    rank = len(mask.shape)
    return op.Unsqueeze(mask, const(list(range(4 - rank))))


def merge(attn_mask, keep):
    """The model's mask (bool or additive float, or None) ANDed with a bool keep-mask (or None).
    Bool stays bool; a float mask gets -inf where keep is False. (Values built here carry no
    dtype, so callers go by the model mask's dtype.)"""
    if keep is None:
        return attn_mask
    if attn_mask is None:
        return keep
    if attn_mask.dtype == ir.DataType.BOOL:
        return op.And(to_4d(attn_mask), keep)
    return op.Where(keep, to_4d(attn_mask), op.CastLike(const(NEG_INF, np.float32), attn_mask))


def bias(attn_mask, keep, like):
    """The model's mask (or None) and a bool keep-mask (or None) as one additive float bias in
    ``like``'s dtype, 4-D: 0 / -inf for bool masks, the model's float mask as it is."""
    neg_inf = op.CastLike(const(NEG_INF, np.float32), like)
    if attn_mask is None:
        out = op.CastLike(const(0.0, np.float32), like)
    elif attn_mask.dtype == ir.DataType.BOOL:
        out = op.Where(to_4d(attn_mask), op.CastLike(const(0.0, np.float32), like), neg_inf)
    else:
        out = op.CastLike(to_4d(attn_mask), like)
    return out if keep is None else op.Where(keep, out, neg_inf)


def zero_nan(x):
    """A row whose keys are all masked gives NaN from a softmax over -inf; the canonical op
    defines it as zeros."""
    return op.Where(op.IsNaN(x), op.CastLike(const(0.0, np.float32), x), x)
