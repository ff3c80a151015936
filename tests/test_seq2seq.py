"""Encoder-decoder generation (rewriter.seq2seq): T5, BART and Whisper split into an encoder
and a cached decoder step; greedy tokens equal ``model.generate``; variants on either side."""

from __future__ import annotations

import operator

import pytest
import torch
import zoo

import rewriter as rw
import rewriter.decoder as decoder_mod
from rewriter.decoder import DecoderError
from rewriter.ir.precision import EXACT_TOLERANCE
from rewriter.seq2seq import DECODER_INPUT, Seq2Seq, build_seq2seq

ARCHS = ["t5", "bart", "whisper"]
NEW_TOKENS = 10


def capture(arch: str, impl: str = "sdpa"):
    model = zoo.seq2seq_model(arch, impl)
    return model, rw.capture(model, (), zoo.seq2seq_inputs(arch))


def encoder_inputs(arch: str, batch: int = 3, seq: int = 9) -> tuple[torch.Tensor, dict]:
    """(the encoder's main input, its kwargs for model.generate); other shapes than capture's,
    and a text mask with pads at the end of two rows."""
    kwargs = zoo.seq2seq_inputs(arch, batch, seq)
    kwargs = {k: v for k, v in kwargs.items() if k not in (DECODER_INPUT, "use_cache")}
    if "attention_mask" in kwargs:
        kwargs["attention_mask"][1, -4:] = 0
    return next(iter(kwargs.values())), kwargs


def hf_greedy(model, kwargs: dict, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=n, do_sample=False, num_beams=1)


def reference_greedy(program, kwargs: dict, start: int, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: one full forward of the program per token."""
    batch = next(iter(kwargs.values())).shape[0]
    ids = torch.full((batch, 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            out = program.module(**kwargs, decoder_input_ids=ids, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(arch, impl):
    model, prog = capture(arch, impl)
    s2s = prog.decoder()
    assert isinstance(s2s, Seq2Seq)
    assert s2s.verify_error <= EXACT_TOLERANCE
    cross = [c for c in s2s.context if c.startswith("cross_")]
    assert len(cross) == 2 * zoo.LAYERS  # K and V of each decoder layer, computed once
    assert len(s2s.decoder.cache) == 2 * zoo.LAYERS  # self-attention K and V per layer
    inputs, kwargs = encoder_inputs(arch)
    want = hf_greedy(model, kwargs, NEW_TOKENS)
    got = s2s.generate(inputs, NEW_TOKENS, kwargs.get("attention_mask"))
    assert got.shape == (inputs.shape[0], 1 + NEW_TOKENS)
    # Whisper's generate returns the new tokens without the start token
    assert torch.equal(got[:, -want.shape[1]:], want)
    assert len(set(got[:, 1:].flatten().tolist())) > 2  # tokens that can tell a bad cache


def test_encoder_runs_once_per_sequence():
    """The decoder step reads cross K/V as inputs: no encoder weights in its graph."""
    _, prog = capture("t5")
    s2s = prog.decoder()
    step_weights = {n.target for n in s2s.decoder.module.graph.nodes if n.op == "get_attr"}
    assert not any(t.startswith("encoder.") for t in step_weights)
    assert any(t.startswith("encoder.") for t in
               (n.target for n in s2s.encoder.graph.nodes if n.op == "get_attr"))
    # the cross-attention projections run in the encoder half
    assert any("EncDecAttention.k" in t for t in
               (n.target for n in s2s.encoder.graph.nodes if n.op == "get_attr"))
    assert not any("EncDecAttention.k" in t for t in step_weights)


@pytest.mark.parametrize("arch, specs", [
    ("t5", ["gqa:kv-heads=2,merge=mean"]),
    ("t5", ["prune-heads:ratio=0.5,score=magnitude"]),
    ("bart", ["sparse:window=3"]),
    ("whisper", ["gqa:kv-heads=1,merge=mean", "sparse:window=4,sink=1"]),
], ids=["t5-gqa", "t5-prune", "bart-window", "whisper-gqa+sink"])
def test_variants_on_both_sides(arch, specs):
    """Variants rewrite encoder, decoder self- and cross-attention sites alike; the cached
    decoder then generates what the rewritten program does without a cache."""
    _, prog = capture(arch)
    new = rw.rewrite(prog, specs)
    s2s = new.decoder()
    assert s2s.verify_error <= EXACT_TOLERANCE
    inputs, kwargs = encoder_inputs(arch)
    want = reference_greedy(new, kwargs, s2s.start_token, NEW_TOKENS)
    assert torch.equal(s2s.generate(inputs, NEW_TOKENS, kwargs.get("attention_mask")), want)
    if specs[0].startswith("gqa"):
        heads = int(specs[0].split("=")[1].split(",")[0])
        assert {e.heads for e in s2s.decoder.cache} == {heads}
        cross = s2s.encode(**kwargs)[0]
        assert cross.shape[1] == heads  # cross K/V shrink with the sites they feed
    if "sink=1" in specs[-1]:  # decoder self-attention keeps sink + window: bounded caches
        assert all(e.bound == 4 for e in s2s.decoder.cache)


def test_t5_mask_rows_are_checked(monkeypatch):
    """T5's decoder self-attention mask (relative bias + causal) is recomputed over all
    positions and its last rows kept; keeping the first rows instead fails the float64
    check (a test that the check can fail)."""
    original = decoder_mod._mask_rows

    def first_rows(graph, ids, nodes, past_len, reads_ids):
        rows, copies = original(graph, ids, nodes, past_len, reads_ids)
        for node in rows.values():  # slice(full, dim, P, P + S) -> slice(full, dim, 0, S)
            full, dim, _, total = node.args
            with graph.inserting_before(node):
                new = graph.call_function(operator.sub, (total, past_len))
            node.args = (full, dim, 0, new)
        return rows, copies

    _, prog = capture("t5")
    monkeypatch.setattr(decoder_mod, "_mask_rows", first_rows)
    with pytest.raises(DecoderError, match="max relative error"):
        build_seq2seq(prog)


def test_refusals():
    entry = zoo.get("llama-sdpa")
    lm = rw.capture(entry.build(), *entry.inputs(2, 5))
    with pytest.raises(DecoderError, match="not an encoder-decoder capture"):
        build_seq2seq(lm)
    _, prog = capture("t5")
    with pytest.raises(DecoderError, match="padded=True is for causal LMs"):
        prog.decoder(padded=True)
    with pytest.raises(DecoderError, match="cross attention: build an encoder-decoder"):
        decoder_mod.build_decoder(prog)
    s2s = prog.decoder()
    with pytest.raises(DecoderError, match="the encoder needs attention_mask"):
        s2s.encode(input_ids=torch.ones(1, 3, dtype=torch.long))
