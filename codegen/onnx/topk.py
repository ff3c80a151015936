"""Top-k block selection (rewriter.ir.topk) built inside the ONNX graph with standard ops.

The same definition as `TopKSpec.keep`, step for step: block means (Pad, Reshape, ReduceSum), the
estimate, the eligible blocks, TopK, then the token-level keep-mask. Traced onnxscript helpers
(called while torch.onnx translates a node). Shape glossary: B batch, Hq/Hkv heads, G = Hq/Hkv,
Sq queries, Sk keys, D head dim, nQ query blocks in the call, nK key blocks.

The mask goes to the attention op as a dense [B, Hq, Sq, Sk] keep-mask: ORT has no block-sparse
attention on CPU that takes per-head block lists, and the selection itself costs 1/B of the
score matrix.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset23 as op

from rewriter.codegen.onnx.masks import const, dim
from rewriter.ir.topk import TopKSpec

FLOAT = ir.DataType.FLOAT


def _block_means(x, blocks, size: int, head_dim: int, front=None):
    """[B, H, S, D] -> [B, H, blocks, D]: means over runs of ``size`` rows, the first run
    starting ``front`` rows before row 0 (pads do not count). Pad + Reshape + ReduceSum: linear
    in S (a pooling MatMul would cost S * blocks)."""
    length = dim(x, 2)
    zero = const(0)
    front = zero if front is None else front
    back = op.Sub(op.Sub(op.Mul(blocks, const(size)), front), length)
    pads = op.Concat(const([0, 0]), op.Unsqueeze(front, const([0])), const([0, 0, 0]),
                     op.Unsqueeze(back, const([0])), const([0]), axis=0)
    sums = op.ReduceSum(op.Reshape(op.Pad(x, pads), const([0, 0, -1, size, head_dim])),
                        const([3]), keepdims=0)
    starts = op.Mul(op.Range(zero, blocks, const(1)), const(size))  # [blocks]
    real = op.Sub(op.Min(op.Add(starts, const(size)), op.Add(front, length)),
                  op.Max(starts, front))
    return op.Div(sums, op.Cast(op.Unsqueeze(real, const([1])), to=FLOAT))


def _zeros_like(x):
    return op.Expand(const(0.0, np.float32), op.Shape(x))


def topk_keep(spec: TopKSpec, q, k, q_heads: int, kv_heads: int, head_dim: int):
    """[B, Hq, Sq, Sk] bool keep-mask of ``spec`` for queries q and all keys k."""
    size, group = const(spec.block), q_heads // kv_heads
    one = const(1)
    sq, sk = dim(q, 2), dim(k, 2)
    offset = op.Sub(sk, sq)
    first = op.Div(offset, size)
    nq = op.Add(op.Sub(op.Div(op.Sub(sk, one), size), first), one)
    nk = op.Div(op.Add(sk, const(spec.block - 1)), size)
    rows = op.Add(op.Range(const(0), sq, one), offset)  # [Sq] positions
    keys = op.Range(const(0), sk, one)  # [Sk]
    row_block = op.Sub(op.Div(rows, size), first)
    key_block = op.Div(keys, size)
    qf, kf = op.Cast(q, to=FLOAT), op.Cast(k, to=FLOAT)
    front = op.Sub(offset, op.Mul(first, size))  # query rows start this far into block 0
    q_bar = _block_means(qf, nq, spec.block, head_dim, front)  # [B, Hq, nQ, D]
    q_bar = op.ReduceMean(op.Reshape(q_bar, const([0, kv_heads, group, -1, head_dim])),
                          const([2]), keepdims=0)  # [B, Hkv, nQ, D]
    if spec.channels is None:
        k_bar = _block_means(kf, nk, spec.block, head_dim)  # [B, Hkv, nK, D]
        scores = op.MatMul(q_bar, op.Transpose(k_bar, perm=[0, 1, 3, 2]))
    else:
        c = min(spec.channels, head_dim)
        _, picked = op.TopK(op.Abs(q_bar), const([c]), axis=-1)
        u = op.ScatterElements(_zeros_like(q_bar), picked,
                               op.GatherElements(q_bar, picked, axis=-1), axis=-1)
        approx = op.MatMul(u, op.Transpose(kf, perm=[0, 1, 3, 2]))  # [B, Hkv, nQ, Sk]
        pad = op.Sub(op.Mul(nk, size), sk)
        approx = op.Pad(approx, op.Concat(const([0] * 7), op.Unsqueeze(pad, const([0])),
                                          axis=0),
                        const(float("-inf"), np.float32))
        approx = op.Reshape(approx, const([0, 0, 0, -1, spec.block]))
        scores = op.ReduceMax(approx, const([-1]), keepdims=0)  # [B, Hkv, nQ, nK]
    # eligible key blocks: causal, not wholly inside the sink or the last row's local band
    qb = op.Unsqueeze(op.Add(op.Range(const(0), nq, one), first), const([1]))  # [nQ, 1]
    kb = op.Unsqueeze(op.Range(const(0), nk, one), const([0]))  # [1, nK]
    last_row = op.Min(op.Add(op.Mul(qb, size), const(spec.block - 1)), op.Sub(sk, one))
    in_sink = op.LessOrEqual(op.Mul(op.Add(kb, one), size), const(spec.sink))
    in_local = op.Less(op.Sub(last_row, op.Mul(kb, size)), const(spec.local))
    eligible = op.And(op.LessOrEqual(kb, qb), op.Not(op.Or(in_sink, in_local)))
    scores = op.Where(eligible, scores, const(float("-inf"), np.float32))
    count = op.Unsqueeze(op.Min(nk, const(spec.topk)), const([0]))
    _, picked = op.TopK(scores, count, axis=-1)
    ones = op.Expand(const(1.0, np.float32), op.Shape(picked))
    chosen = op.ScatterElements(_zeros_like(scores), picked, ones, axis=-1)
    chosen = op.And(op.Cast(chosen, to=ir.DataType.BOOL), eligible)  # [B, Hkv, nQ, nK]
    tokens = op.Gather(op.Gather(chosen, row_block, axis=2), key_block, axis=3)
    pos, key = op.Unsqueeze(rows, const([1])), op.Unsqueeze(keys, const([0]))
    causal = op.LessOrEqual(key, pos)  # [Sq, Sk]
    static = op.And(causal, op.Or(op.Less(key, const(spec.sink)),
                                  op.Less(op.Sub(pos, key), const(spec.local))))
    keep = op.Or(static, op.And(tokens, causal))  # [B, Hkv, Sq, Sk]
    if group == 1:
        return keep
    wide = op.Concat(op.Shape(keep, start=0, end=2), const([group]),
                     op.Shape(keep, start=2, end=4), axis=0)
    keep = op.Expand(op.Unsqueeze(keep, const([2])), wide)  # [B, Hkv, G, Sq, Sk]
    return op.Reshape(keep, op.Concat(op.Shape(keep, start=0, end=1), const([q_heads]),
                                      op.Shape(keep, start=3, end=5), axis=0))
