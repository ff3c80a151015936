"""sparse:topk: dynamic top-k block selection (rewriter.ir.topk).

The keep-mask is held to a brute-force definition written with Python loops (block means,
scores, eligibility, the K best); the block-skipping execution to the naive reference with
that mask; the variant on a zoo LM to its decoders. ONNX exports are checked in
tests/codegen (test_onnx.py, test_onnx_decoder.py)."""

from __future__ import annotations

import pytest
import torch
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter as rw
from rewriter.errors import SpecError
from rewriter.ir.ops import attention, cached_attention, reference_attention
from rewriter.ir.topk import TopKSpec, topk_attention


def brute_keep(spec: TopKSpec, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, Hq, Sq, Sk]: the definition in rewriter.ir.topk's docstring, element by element."""
    bt, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group, size = hq // hkv, spec.block
    q, k = q.double(), k.double()
    keep = torch.zeros(bt, hq, sq, sk, dtype=torch.bool)
    pos = [i + sk - sq for i in range(sq)]
    nk = -(-sk // size)
    for b in range(bt):
        for g in range(hkv):
            heads = range(g * group, (g + 1) * group)
            for qb in sorted({p // size for p in pos}):
                rows = [i for i in range(sq) if pos[i] // size == qb]
                q_bar = torch.stack([q[b, h, i] for h in heads for i in rows]).mean(0)
                last = max(pos[i] for i in rows)
                scores = {}
                for kb in range(nk):
                    keys = range(kb * size, min(sk, (kb + 1) * size))
                    in_sink = (kb + 1) * size <= spec.sink
                    in_local = last - kb * size < spec.local
                    if kb > qb or in_sink or in_local:
                        continue
                    if spec.channels is None:
                        scores[kb] = float(q_bar @ torch.stack([k[b, g, j] for j in keys]).mean(0))
                    else:
                        top = q_bar.abs().argsort(descending=True)[:spec.channels]
                        scores[kb] = max(float(q_bar[top] @ k[b, g, j][top]) for j in keys)
                chosen = set(sorted(scores, key=scores.get, reverse=True)[:spec.topk])
                for i in rows:
                    for j in range(sk):
                        p = pos[i]
                        kept = j <= p and (j < spec.sink or p - j < spec.local
                                           or j // size in chosen)
                        for h in heads:
                            keep[b, h, i, j] = kept
    return keep


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    sk = draw(st.integers(1, 30))
    sq = draw(st.integers(1, sk))
    spec = TopKSpec(topk=draw(st.integers(1, 3)), block=draw(st.integers(1, 6)),
                    sink=draw(st.integers(0, 4)), local=draw(st.integers(0, 6)),
                    estimate=draw(st.sampled_from(["mean", "channels:1", "channels:3"])))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hkv * group, sq, 4, generator=g)
    k = torch.randn(2, hkv, sk, 4, generator=g)
    v = torch.randn(2, hkv, sk, 5, generator=g)
    return spec, q, k, v


@settings(max_examples=60, deadline=None)
@given(cases())
def test_keep_mask_is_the_definition(case):
    spec, q, k, _ = case
    assert torch.equal(spec.keep(q, k), brute_keep(spec, q, k))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_block_skipping_equals_the_reference(case):
    spec, q, k, v = case
    want = reference_attention(q, k, v, scale=0.5, sparsity=spec.format())
    got = topk_attention(q, k, v, None, scale=0.5, spec=spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_model_masks_and_is_causal_are_anded_in(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    mask = torch.rand(2, 1, 20, 20, generator=g) > 0.2
    if mask_kind == "float":
        mask = torch.zeros(2, 1, 20, 20).masked_fill(~mask, float("-inf")) + \
            torch.randn(2, 1, 20, 20, generator=g)
    sparsity = "topk=1,block=4,sink=1,local=3,estimate=mean"
    for causal in (False, True):
        want = reference_attention(q, k, v, mask, scale=0.3, is_causal=causal, sparsity=sparsity)
        got = attention(q, k, v, mask, scale=0.3, is_causal=causal, sparsity=sparsity)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_decode_step_selects_for_its_own_query():
    """cached_attention of one new token = the reference over past + new with the top-k mask
    of that single query (its own selection, not a prefill's)."""
    g = torch.Generator().manual_seed(1)
    past_k, past_v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), *(torch.randn(1, 2, 1, 8, generator=g)
                                                       for _ in range(2))
    sparsity = "topk=2,block=4,sink=2,local=4,estimate=mean"
    out, keys, values = cached_attention(q, k, v, past_k, past_v, scale=0.3, sparsity=sparsity)
    want = reference_attention(q, keys, values, scale=0.3, sparsity=sparsity)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    kept = TopKSpec.parse(sparsity).density(q, keys) * 41
    # sink 2 + local 4 + two blocks of 4, less what the blocks share with the sink or band
    assert 2 + 4 + 4 <= round(kept) <= 2 + 4 + 2 * 4


@pytest.mark.parametrize("text, message", [
    ("topk=0", "positive"), ("topk=2,block=x", "not an integer"),
    ("topk=2,estimate=max", "mean or channels:C"), ("topk=2,estimate=channels:0", "channels"),
    ("block=4", "needs topk=K"), ("topk=2,windows=3", "unknown item"),
])
def test_spec_errors(text, message):
    with pytest.raises(SpecError, match=message):
        TopKSpec.parse(text)


def test_format_round_trips():
    spec = TopKSpec(3, block=16, sink=0, local=32, estimate="channels:8")
    assert TopKSpec.parse(spec.format()) == spec


def _lm():
    return rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 24),), {"use_cache": False})


def test_variant_on_a_zoo_lm_prefills_like_the_program_and_decodes():
    prog = _lm()
    new = rw.rewrite(prog, "sparse:topk=1,block=4,local=4,sink=1")
    assert {s.sparsity for s in new.sites} == {"topk=1,block=4,sink=1,local=4,estimate=mean"}
    info = new.manifest["passes"][-1]
    assert info["sites"] == 2 and info["max_blocks_per_query_block"] == 3
    ids = zoo._ids(2, 24, seed=3)
    dense = prog.module(ids, use_cache=False)[0]
    sparse = new.module(ids, use_cache=False)[0]
    assert not torch.allclose(dense, sparse)  # the selection drops keys at 24 tokens
    dec = new.decoder()  # checked against the program: a prefill of the whole text
    logits, _ = dec.step(ids, dec.empty_cache(2))
    torch.testing.assert_close(logits, sparse, rtol=1e-4, atol=1e-5)
    assert dec.generate(ids[:, :10], 6).shape == (2, 16)


@pytest.mark.parametrize("spec, message", [
    ("sparse:topk=2,window=8", "does not take window="),
    ("sparse:window=8,block=4", "block= only goes with topk=K"),
    ("sparse:topk=2,estimate=channels:x", "mean or channels:C"),
])
def test_pass_spec_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        rw.rewrite(_lm(), spec)


def test_topk_needs_causal_self_attention():
    entry = zoo.get("bert-sdpa")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    with pytest.raises(SpecError, match="serves causal self-attention"):
        rw.rewrite(prog, "sparse:topk=2")
