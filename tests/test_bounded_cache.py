"""Bounded KV caches (StreamingLLM): sink + window heads keep only what their mask reads.

Positive: the bounded op equals the full-cache op chunk after chunk, far past the window; the
bounded decoders of zoo models and SmolLM2 equal the program (logits) and greedy decoding
without a cache, with their cache tensors at the bound; sites whose KV heads differ are split
and put back in head order. Negative: dense and top-k programs keep full caches (no
past_length). Numeric: the accounting's bytes at a length equal the decoder's tensors."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.analysis.quality import logits_fn
from rewriter.decoder import build_decoder, greedy_reference
from rewriter.ir.masks import MaskSpec
from rewriter.ir.ops import bounded_cached_attention, cached_attention, evict

zoo = pytest.importorskip("zoo")

TOL = 1e-5


def capture_lm(name: str, seq: int = 9) -> rw.Program:
    return rw.capture(zoo.get(name).build(), (zoo._ids(2, seq),), {"use_cache": False})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def chunked(decoder, ids: torch.Tensor, cuts: list[int]):
    """(logits of ``ids`` fed in chunks ending at ``cuts``, the last present cache)."""
    past, out, start = decoder.empty_cache(ids.shape[0]), [], 0
    for end in [*cuts, ids.shape[1]]:
        logits, past = decoder.step(ids[:, start:end], past)
        out.append(logits)
        start = end
    return torch.cat(out, dim=1), past


# --- the op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity, extra", [
    ("window=5,sink=2", 0), ("window=4", 0), ("window=5,sink=2,dilation=2", 0),
    ("window=6,sink=1,heads=s/3/s/2", 0),  # per-head windows: the bound is the largest
    ("window=5,sink=2", 3),  # a larger bound than needed (a cache shared with a wider site)
])
def test_bounded_op_equals_full_cache(sparsity, extra):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, total = 2, 4, 2, 8, 40
    q, k, v = (torch.randn(b, h, total, d, generator=g) for h in (hq, hkv, hkv))
    bound = MaskSpec.parse(sparsity).cache_bound(hq) + extra
    full_k = full_v = torch.zeros(b, hkv, 0, d)
    bk, bv, past, t = full_k, full_v, torch.tensor(0), 0
    for c in [5, 1, 1, 3, 1, 7, 1, 1, 2, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1]:
        args = (q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c])
        want, full_k, full_v = cached_attention(*args, full_k, full_v, scale=0.3,
                                                sparsity=sparsity)
        got, bk, bv = bounded_cached_attention(*args, bk, bv, past, scale=0.3,
                                               sparsity=sparsity, bound=bound)
        past, t = past + c, t + c
        assert rel_err(got, want) < TOL, (sparsity, t)
        assert bk.shape[2] == min(t, bound) and bv.shape[2] == min(t, bound)
    sink = MaskSpec.parse(sparsity).sink
    assert torch.equal(bk, evict(full_k, sink, bound))  # the sink and the last positions


def test_evict_keeps_sink_and_tail():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    assert evict(x, 2, 5).flatten().tolist() == [0, 1, 7, 8, 9]
    assert evict(x, 0, 3).flatten().tolist() == [7, 8, 9]
    assert evict(x, 2, 2).flatten().tolist() == [0, 1]  # window 1: the sink alone is kept
    assert evict(x, 2, 12).flatten().tolist() == list(range(10))  # shorter than the bound


def test_cache_bounds_of_masks():
    assert MaskSpec.parse("window=256,sink=4").cache_bound(9) == 259
    assert MaskSpec.parse("window=8,heads=ssfssfsss").kv_head_bounds(9, 3) \
        == [None, None, 7]
    assert MaskSpec.parse("window=8,sink=1,heads=s/4/s/f").head_bounds(4) == [8, 4, 8, None]
    assert MaskSpec.parse("").cache_bound(4) is None
    assert MaskSpec.parse("window=8,heads=ssff").select_heads([2, 3], 4).is_dense
    assert MaskSpec.parse("window=8,sink=2,heads=s/4/f/s").select_heads([0, 1], 4).format() \
        == "window=8,sink=2,heads=s4"


# --- decoders --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec, split", [
    ("llama-sdpa", "sparse:window=3,sink=1", False),
    ("llama-sdpa", "sparse:window=4,heads=0;1", True),  # KV head 0 streams, KV head 1 full
    ("gpt2-eager", "sparse:window=3,sink=2,heads=0;2", True),  # MHA: heads 0, 2 | 1, 3
])
def test_bounded_decoder_equals_program(name, spec, split):
    """24 tokens through windows of 3-4: eviction happens at every step after the first few;
    logits equal one forward of the program and the caches stay at their bound."""
    prog = rw.rewrite(capture_lm(name), spec)
    dec = build_decoder(prog)
    assert dec.bounded and dec.input_names[-1] == "past_length"
    assert any(e.kv_heads is not None for e in dec.cache) == split
    ids = zoo._ids(2, 24, seed=3)
    with torch.no_grad():
        want = logits_fn(prog)(ids)
    got, present = chunked(dec, ids, [6, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21, 22, 23])
    assert rel_err(got, want) < TOL
    for entry, tensor in zip(dec.cache, present, strict=False):
        assert tensor.shape[2] == entry.positions(24)
    assert int(present[-1]) == 24  # present_length
    acc = prog.accounting(24)
    assert acc["kv_cache_bytes_at_ctx"] == dec.cache_bytes(24)
    assert dec.cache_bytes(24) < prog.decoder(bounded=False).cache_bytes(24)


def test_bounded_generation_equals_greedy_and_full_cache():
    prog = rw.rewrite(capture_lm("llama-sdpa"), "sparse:window=4,sink=2")
    prompt = zoo._ids(2, 5, seed=7)
    tokens = prog.decoder().generate(prompt, 20)
    assert torch.equal(tokens, greedy_reference(prog, prompt, 20))
    assert torch.equal(tokens, prog.decoder(bounded=False).generate(prompt, 20))


@pytest.mark.parametrize("spec", ["gqa:kv-heads=1,merge=mean", "share-kv:group=2"])
def test_bounded_cache_after_other_variants(spec):
    prog = rw.rewrite(capture_lm("llama-sdpa"), [spec, "sparse:window=3,sink=1"])
    dec = build_decoder(prog)
    assert all(e.bound == 3 for e in dec.cache)
    ids = zoo._ids(2, 16, seed=4)
    with torch.no_grad():
        want = logits_fn(prog)(ids)
    got, _ = chunked(dec, ids, [5, 9, 10, 11, 12, 13, 14, 15])
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("spec", [None, "sparse:topk=1,block=2,sink=0,local=2"])
def test_dense_and_topk_caches_stay_full(spec):
    prog = capture_lm("llama-sdpa")
    if spec:
        prog = rw.rewrite(prog, spec)
    dec = build_decoder(prog)
    assert not dec.bounded and "past_length" not in dec.input_names
    assert all(e.bound is None for e in dec.cache)


# --- SmolLM2 -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_bounded_generation():
    """KV heads 0 and 2 stream (window 4, sink 2), KV head 1 is full: each site is split in
    two ops and its outputs put back in head order."""
    from rewriter.models import load

    loaded = load("smollm2-135m")
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    prog = rw.rewrite(rw.capture(loaded.model, (ids,), {"use_cache": False}),
                      "sparse:window=4,sink=2,heads=0;1;2;6;7;8")
    dec = prog.decoder()
    assert dec.bounded
    prompt = loaded.tokenizer("The history of the city begins with a small harbour town "
                              "that grew", return_tensors="pt")["input_ids"]
    assert [e.bound for e in dec.cache[:4]] == [5, 5, None, None]
    tokens = dec.generate(prompt, 12)
    assert prompt.shape[1] + 12 > 4 * dec.cache_report()["bound_tokens"]  # well past it
    assert torch.equal(tokens, greedy_reference(prog, prompt, 12))


def test_manifest_reports_the_bound():
    from rewriter.checkpoint import manifest_of

    prog = rw.rewrite(capture_lm("llama-sdpa"), "sparse:window=4,heads=0;1")
    m = manifest_of(prog)
    assert m["kv_cache_bound_tokens"] == 3
    # per layer: KV head 0 keeps 3 positions, KV head 1 all 1024 (bf16, K and V, D = 8)
    assert m["kv_cache_bytes_at_1024"] == 2 * (3 + 1024) * 2 * 8 * 2
    assert manifest_of(capture_lm("llama-sdpa"))["kv_cache_bound_tokens"] is None
