"""The Triton top-k kernel (rewriter.codegen.triton.topk), run by the interpreter, against the
naive reference with the same mask; its block lists; and a zoo LM compiled with it."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.errors import SpecError
from rewriter.ir.ops import reference_attention
from rewriter.ir.topk import TopKSpec

zoo = pytest.importorskip("zoo")


def _qkv(b, hq, hkv, sq, sk, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, dv, generator=g))


@pytest.mark.parametrize("shape, spec, causal", [
    ((2, 4, 2, 40, 40, 16, 16), TopKSpec(1, 16, 3, 16), True),  # prefill, GQA, partial block
    ((1, 3, 1, 1, 70, 32, 16), TopKSpec(2, 16, 0, 5, "channels:4"), False),  # a decode step
    ((1, 2, 2, 20, 53, 8, 8), TopKSpec(2, 16, 17, 1), True),  # Sq < Sk, top-left causal
    ((1, 2, 1, 48, 48, 16, 16), TopKSpec(1, 16, 0, 0), False),  # rows left with no key
])
def test_kernel_equals_the_reference(shape, spec, causal):
    from rewriter.codegen.triton.topk import topk_triton_attention

    q, k, v = _qkv(*shape)
    got = topk_triton_attention(q, k, v, scale=0.3, spec=spec, is_causal=causal)
    want = reference_attention(q, k, v, scale=0.3, is_causal=causal, sparsity=spec.format())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_kernel_with_a_model_mask(kind):
    from rewriter.codegen.triton.topk import topk_triton_attention

    q, k, v = _qkv(2, 4, 2, 40, 40, 16, 16)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 1, 40, 40, generator=g) > 0.3
    if kind == "float":
        mask = torch.randn(2, 1, 40, 40, generator=g).masked_fill(~mask, float("-inf"))
    spec = TopKSpec(1, 16, 2, 16)
    got = topk_triton_attention(q, k, v, mask, scale=0.3, spec=spec)
    want = reference_attention(q, k, v, mask, scale=0.3, sparsity=spec.format())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_block_lists_visit_fewer_tiles_than_dense():
    from rewriter.codegen.triton.topk import block_lists

    spec = TopKSpec(2, 16, 4, 16)
    q, k, _ = _qkv(1, 4, 2, 256, 256, 16, 16)
    lists, picked = block_lists(spec, q, k)
    assert lists.shape[:3] == (1, 2, 16)
    visited = int((lists >= 0).sum())
    causal_tiles = 2 * 16 * 17 // 2  # KV heads x lower triangle of 16 x 16 tiles
    assert visited <= 2 * 16 * (1 + 2 + 2)  # sink, band (two tiles), two selected
    assert visited < causal_tiles / 2
    assert int(picked.sum()) == 2 * (2 * 14 + 1)  # K=2 per block once 2 are eligible


def test_unsupported_calls_are_spec_errors():
    from rewriter.codegen.triton.topk import check

    with pytest.raises(SpecError, match="power of two"):
        check(TopKSpec(2, 24), dtype=torch.float32, head_dim=16, v_head_dim=16, mask="none",
              softcap=0.0)
    with pytest.raises(SpecError, match="softcap"):
        check(TopKSpec(2, 16), dtype=torch.float32, head_dim=16, v_head_dim=16, mask="bool",
              softcap=30.0)


def test_compiled_zoo_lm_runs_the_topk_kernel():
    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 40),), {"use_cache": False})
    new = rw.rewrite(prog, "sparse:topk=1,block=16,local=16,sink=2")
    compiled = new.compile("triton")
    record = compiled.manifest["compile"]["sites"]
    assert {r["backend"] for r in record.values()} == {"triton"}
    assert all(r["kernel"].startswith("topk_attn_fwd") for r in record.values())
    ids = zoo._ids(1, 45, seed=2)
    want = new.module(ids, use_cache=False)[0]
    got = compiled.module(ids, use_cache=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
