"""Decoders with a KV cache (rewriter.decoder): the cache surgery on captured causal LMs.

Positive: the decoder reproduces the program (prefill + chunks + one-token steps against one
full forward) and greedy decoding with the cache equals greedy decoding without it, for the
zoo decoders and for variants. Negative: programs the surgery cannot serve are refused with one
line (encoders, extra inputs, static shapes, positions from masks). Model-native sliding windows
are served: tests/test_native_windows.py."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
import rewriter.decoder as decoder_mod
from rewriter.analysis.quality import logits_fn
from rewriter.decoder import DecoderError, build_decoder, greedy_reference
from rewriter.ir.ops import cached_attention, reference_attention
from rewriter.ir.precision import EXACT_TOLERANCE

zoo = pytest.importorskip("zoo")

TOL = 1e-5
DECODERS = ["llama-sdpa", "llama-eager", "gpt2-eager", "phi3-sdpa", "gpt-neox-sdpa",
            "qwen2-eager", "mistral-sdpa"]


def capture_lm(name: str, seq: int = 9, **kwargs) -> rw.Program:
    """A zoo decoder captured on token ids alone (the causal-LM call convention)."""
    return rw.capture(zoo.get(name).build(), (zoo._ids(2, seq),), {"use_cache": False},
                      **kwargs)


def full_logits(program: rw.Program, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits_fn(program)(ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def chunked_logits(decoder, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of ``ids`` fed to the decoder in chunks ending at ``cuts``."""
    past, out, start = decoder.empty_cache(ids.shape[0]), [], 0
    for end in [*cuts, ids.shape[1]]:
        logits, past = decoder.step(ids[:, start:end], past)
        out.append(logits)
        start = end
    return torch.cat(out, dim=1)


# --- the op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", ["", "window=3", "window=2,sink=1,dilation=2"])
def test_cached_attention_matches_reference(sparsity):
    """cached_attention == reference attention of the new queries over cat(past, new), with a
    bottom-right causal mask, for a GQA 4/2 layout."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, p, s, d = 2, 4, 2, 5, 3, 8
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv))
    pk, pv = torch.randn(b, hkv, p, d, generator=g), torch.randn(b, hkv, p, d, generator=g)
    out, present_k, present_v = cached_attention(q, k, v, pk, pv, scale=0.3, sparsity=sparsity)
    assert torch.equal(present_k, torch.cat([pk, k], 2))
    assert torch.equal(present_v, torch.cat([pv, v], 2))
    causal = torch.arange(p + s)[None, :] <= torch.arange(s)[:, None] + p
    want = reference_attention(q, present_k, present_v, causal, scale=0.3, sparsity=sparsity)
    assert rel_err(out, want) < TOL


# --- positive: zoo decoders --------------------------------------------------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_decoder_reproduces_program(name):
    prog = capture_lm(name)
    dec = build_decoder(prog)
    assert dec.verify_error < EXACT_TOLERANCE  # checked in float64
    ids = zoo._ids(2, 12, seed=3)
    want = full_logits(prog, ids)
    got = chunked_logits(dec, ids, [5, 8, 9, 10, 11])  # a prefill, a chunk, one-token steps
    assert rel_err(got, want) < TOL, name


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2-eager"])
def test_greedy_generation_with_cache_equals_without(name):
    prog = capture_lm(name)
    dec = build_decoder(prog)
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(dec.generate(prompt, 12), greedy_reference(prog, prompt, 12))


def test_cache_layout_llama():
    """One key and one value entry per layer, [B, Hkv, P, D], named past_*/present_*."""
    prog = capture_lm("llama-sdpa")
    dec = prog.decoder()
    layers = len(prog.sites)
    assert [e.input_name for e in dec.cache][:2] == ["past_key_0", "past_value_0"]
    assert len(dec.cache) == 2 * layers
    assert {(e.heads, e.head_dim) for e in dec.cache} == {(prog.sites[0].num_kv_heads,
                                                          prog.sites[0].head_dim)}
    assert dec.input_names[0] == "input_ids" and dec.output_names[0] == "logits"
    logits, present = dec.step(zoo._ids(1, 3), dec.empty_cache(1))
    assert [tuple(t.shape) for t in present][:1] == [(1, prog.sites[0].num_kv_heads, 3,
                                                      prog.sites[0].head_dim)]
    assert logits.shape[:2] == (1, 3)


# --- positive: variants ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sparse:window=3,sink=1", "sparse:window=4",
                                  "sparse:window=4,heads=0;2", "gqa:kv-heads=1,merge=mean",
                                  "share-kv:group=2", "share-attn:group=2",
                                  "prune-heads:heads=0.0;0.1;1.2;1.3"])
def test_variant_decoders(spec):
    """Windows shorter than the sequence, so the cache's bottom-right alignment matters."""
    prog = rw.rewrite(capture_lm("llama-sdpa"), spec)
    dec = build_decoder(prog)
    ids = zoo._ids(2, 12, seed=3)
    assert rel_err(chunked_logits(dec, ids, [6, 9, 10, 11]), full_logits(prog, ids)) < TOL
    if spec.startswith("share-kv"):
        # layers in one run read the first layer's K/V: one cache entry pair for the run
        assert len(dec.cache) == 2
        assert dec.cache[0].sites == (0, 1)
    if spec.startswith("gqa"):
        assert {e.heads for e in dec.cache} == {1}


# --- negative ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("bert-sdpa", "causal self-attention only"),  # an encoder
    # captured with its padding-mask input: the decoder takes token ids alone
    ("llama-sdpa", "mask 'causal-mask\\+padding'|token ids"),
])
def test_non_decoders_are_refused(name, message):
    entry = zoo.get(name)
    args, kwargs = entry.inputs(2, 8)
    prog = rw.capture(entry.build(), args, kwargs)
    with pytest.raises(DecoderError, match=message):
        build_decoder(prog)


def test_static_capture_is_refused():
    prog = capture_lm("llama-sdpa", dynamic=False)
    with pytest.raises(DecoderError, match="static sequence length"):
        build_decoder(prog)


def _positions_not_shifted(graph, ids, past_len, skip=()):  # noqa: ARG001  (its signature)
    return 1  # claims success, but positions restart at 0 after the prefill


def _cache_widens_window(graph, canonical, pasts, sites, groups, length, rows):
    for node in canonical:  # window=3 -> window=12: the cached ops read too many keys
        node.kwargs = {**node.kwargs, "sparsity": "window=12,sink=1"}
    return ORIGINAL_ATTEND(graph, canonical, pasts, sites, groups, length, rows)


def _cache_evicts_too_much(canonical, bounded, unbounded=frozenset()):
    """Bounds one position short: the oldest key of the window is evicted."""
    return {pair: [decoder_mod._Group(g.kv_heads, g.bound and g.bound - 1, g.whole)
                   for g in groups]
            for pair, groups in ORIGINAL_GROUPS(canonical, bounded, unbounded).items()}


ORIGINAL_ATTEND = decoder_mod._attend_over_cache
ORIGINAL_GROUPS = decoder_mod._head_groups


@pytest.mark.parametrize("spec, broken", [
    ("", ("_shift_positions", _positions_not_shifted)),
    ("sparse:window=3,sink=1", ("_attend_over_cache", _cache_widens_window)),
    ("sparse:window=3,sink=1", ("_head_groups", _cache_evicts_too_much)),
], ids=["positions", "sparsity", "eviction"])
def test_broken_surgery_is_caught(monkeypatch, spec, broken):
    """A deliberately wrong surgery fails the float64 self-check by orders of magnitude (the
    message names the error), where fp32 rounding could not hide it or fake it."""
    prog = capture_lm("llama-sdpa")
    if spec:
        prog = rw.rewrite(prog, spec)
    monkeypatch.setattr(decoder_mod, broken[0], broken[1])
    with pytest.raises(DecoderError, match="in float64: max relative error") as info:
        build_decoder(prog)
    err = float(str(info.value).split("max relative error ")[1].split()[0])
    assert err > 1e4 * EXACT_TOLERANCE


@pytest.mark.parametrize("name, why", [
    ("opt-sdpa", "positions counted from the attention mask, not an arange"),
])
def test_unreproducible_models_are_refused(name, why):  # noqa: ARG001  (why: documentation)
    """The surgery assumes plain causal masks and arange positions; the build-time check
    refuses models where that is false instead of returning a wrong decoder."""
    prog = capture_lm(name)
    with pytest.raises(DecoderError, match="does not reproduce the program"):
        build_decoder(prog)
