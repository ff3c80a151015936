"""Gradients of the canonical ops, checked with torch.autograd.gradcheck in float64: the written
out backward (`rewriter.ir.ops.attention_grads`) against finite differences, over masks,
sparsity, softcap, GQA and the KV-cache form."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import rewriter.ir.ops  # noqa: F401  (registers the ops)
from rewriter.ir.ops import reference_attention

ATTN = torch.ops.rewriter.attention
CACHED = torch.ops.rewriter.cached_attention


def _qkv(b=1, hq=4, hkv=2, sq=5, sk=5, d=3, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv))
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in shapes]


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window-sink": {"is_causal": True, "sparsity": "window=2,sink=1"},
    "dilated": {"is_causal": True, "sparsity": "window=4,dilation=2"},
    "per-head": {"is_causal": True, "sparsity": "window=2,heads=fsfs"},
    "softcap": {"softcap": 2.0},
    "softcap-causal-window": {"softcap": 1.5, "is_causal": True, "sparsity": "window=3"},
}


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_gradcheck(case, hkv):
    q, k, v = _qkv(hkv=hkv)
    attrs = {"scale": 0.7, **CASES[case]}
    assert gradcheck(lambda q, k, v: ATTN(q, k, v, None, **attrs), (q, k, v))


def test_attention_gradcheck_float_mask_gets_its_gradient():
    """An additive mask (a learned bias, e.g. T5's relative positions) broadcast over batch
    and heads gets the summed score gradient."""
    q, k, v = _qkv(b=2, sq=4, sk=6)
    bias = torch.randn(1, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k, v, m: ATTN(q, k, v, m, scale=0.5), (q, k, v, bias))
    row = torch.randn(1, 1, 1, 6, dtype=torch.float64, requires_grad=True)  # broadcast 3 ways
    assert gradcheck(lambda q, k, v, m: ATTN(q, k, v, m, scale=0.5, is_causal=True),
                     (q, k, v, row))


def test_attention_gradcheck_bool_mask():
    q, k, v = _qkv(sq=4, sk=6)
    keep = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True
    assert gradcheck(lambda q, k, v: ATTN(q, k, v, keep, scale=0.5), (q, k, v))


def test_row_with_no_key_gets_zero_gradient():
    """Left padding masks whole rows: the output there is zero and so are the gradients, not
    NaN (the reference math through nan_to_num would leak NaNs into dq)."""
    q, k, v = _qkv(sq=3, sk=3)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    mask[..., 0, :] = float("-inf")  # query 0 sees nothing
    out = ATTN(q, k, v, mask, scale=0.5)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 0], torch.zeros_like(q.grad[:, :, 0]))
    assert gradcheck(lambda q, k, v: ATTN(q, k, v, mask, scale=0.5), (q, k, v))


@pytest.mark.parametrize("attrs", [{}, {"sparsity": "window=3,sink=1"}, {"softcap": 2.0}],
                         ids=["dense", "window-sink", "softcap"])
def test_cached_attention_gradcheck(attrs):
    """All three outputs (out, present key, present value) carry gradients back to the new
    tokens and to the past."""
    q, k, v = _qkv(hkv=2, sq=2, sk=2)
    pk, pv = (t.detach()[:, :, :1].repeat(1, 1, 3, 1).requires_grad_() for t in (k, v))

    def fn(q, k, v, pk, pv):
        out, key, value = CACHED(q, k, v, pk, pv, scale=0.6, **attrs)
        return out, key * 1.5, value.sin()  # present K/V used downstream, as by the next step

    assert gradcheck(fn, (q, k, v, pk, pv))


def test_gradients_match_the_reference_math_in_float32():
    """The op's gradients equal autograd through the naive reference (fp32, GQA, causal)."""
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(sq=7, sk=7, d=8, dv=8))
    grad = torch.randn(1, 4, 7, 8, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(ATTN(q, k, v, None, scale=0.3, is_causal=True), (q, k, v), grad)
    want = torch.autograd.grad(reference_attention(q, k, v, None, scale=0.3, is_causal=True),
                               (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_op_stays_inference_only():
    import rewriter.codegen.triton.op  # noqa: F401  (registers attention_triton)

    q, k, v = (t.detach().float().requires_grad_() for t in _qkv())
    out = torch.ops.rewriter.attention_triton(q, k, v, None, scale=0.5)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
