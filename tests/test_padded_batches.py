"""Padded batches in PyTorch decoders (rewriter.decoder, padded=True; rewriter.ir.padding).

Positive: batched greedy generation of left-padded prompts of different lengths equals
generating each prompt alone (with the cache, and without it: one full forward per token), on
zoo Llama, GPT-2, OPT (positions counted from the mask), Phi3 and SmolLM2; a padded decoder's
logits on the real tokens equal the program's on each row alone. Negative: masks that are not
left padding, and sparsity reading absolute positions, get one-line errors."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.analysis.quality import logits_fn
from rewriter.decoder import DecoderError, build_decoder, greedy_reference
from rewriter.ir.ops import reference_attention
from rewriter.ir.padding import AttentionMaskError, padded_cached_attention

zoo = pytest.importorskip("zoo")

TOL = 1e-5
NEW = 8
LENGTHS = [6, 3, 1, 5]


def capture_lm(name: str, batch: int = 2, seq: int = 9) -> rw.Program:
    return rw.capture(zoo.get(name).build(), (zoo._ids(batch, seq),), {"use_cache": False})


def prompts(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    return [zoo._ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, max len], prompts right-aligned, pads first."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def assert_rows_equal_alone(out: torch.Tensor, rows: list[torch.Tensor], alone) -> None:
    """Each row's generated tokens equal ``alone(prompt)``'s."""
    width = max(len(r) for r in rows)
    assert out.shape == (len(rows), width + NEW)
    for i, r in enumerate(rows):
        want = alone(r[None])
        assert torch.equal(out[i, width:], want[0, len(r):]), f"row {i} (prompt {len(r)})"


# --- the op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", ["", "window=3"])
def test_padded_cached_attention_matches_reference(sparsity):
    """padded_cached_attention == reference attention over cat(past, new), bottom-right
    causal, pad keys masked (each query keeps its own key), GQA 4/2."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, p, s, d = 2, 4, 2, 5, 3, 8
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv))
    pk, pv = torch.randn(b, hkv, p, d, generator=g), torch.randn(b, hkv, p, d, generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :3] = 0
    out, present_k, present_v = padded_cached_attention(q, k, v, pk, pv, mask, scale=0.3,
                                                        sparsity=sparsity)
    assert torch.equal(present_k, torch.cat([pk, k], 2))
    keep = (torch.arange(p + s)[None, :] <= torch.arange(s)[:, None] + p) \
        & mask.bool()[:, None, None, :]
    want = reference_attention(q, present_k, present_v, keep, scale=0.3, sparsity=sparsity)
    assert float((out - want).abs().max()) < TOL


# --- positive: zoo decoders --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2-eager", "phi3-sdpa"])
def test_batched_generation_equals_each_prompt_alone(name):
    """Program.decoder().generate with a mask hands the batch to a padded decoder; every row
    equals greedy decoding of its prompt alone with the cache and without it."""
    prog = capture_lm(name)
    dec = prog.decoder()
    rows = prompts()
    ids, mask = left_pad(rows)
    out = dec.generate(ids, NEW, attention_mask=mask)
    assert dec.padded_decoder().padded and not dec.padded
    assert "attention_mask" in dec.padded_decoder().input_names
    assert_rows_equal_alone(out, rows, lambda p: dec.generate(p, NEW))
    assert_rows_equal_alone(out, rows, lambda p: greedy_reference(prog, p, NEW))
    assert torch.equal(out[:, :ids.shape[1]], ids)  # the prompt, pads included, comes first


def test_opt_positions_from_the_mask():
    """OPT counts positions from the attention mask (cumsum): only a padded decoder, which
    has the mask, can serve it; then rows equal each prompt alone."""
    prog = capture_lm("opt-sdpa")
    dec = prog.decoder(padded=True)
    rows = prompts()
    ids, mask = left_pad(rows)
    out = dec.generate(ids, NEW, attention_mask=mask)
    assert_rows_equal_alone(out, rows, lambda p: greedy_reference(prog, p, NEW))
    # without a mask (all ones): the plain greedy decoding
    assert torch.equal(dec.generate(ids[:2, -3:], NEW), greedy_reference(prog, ids[:2, -3:],
                                                                         NEW))


def test_padded_logits_equal_each_row_alone():
    """Prefill, a chunk and one-token steps of a left-padded batch: logits on the real tokens
    equal one forward of the program over each row's tokens alone."""
    prog = capture_lm("llama-sdpa")
    dec = build_decoder(prog, padded=True)
    assert dec.verify_error < 1e-12  # float64 checks, nothing padded and padded
    ids = zoo._ids(3, 12, seed=3)
    pads = [0, 4, 7]
    mask = torch.ones_like(ids)
    for i, n in enumerate(pads):
        mask[i, :n] = 0
    past, got, start = dec.empty_cache(3), [], 0
    for end in [6, 9, 10, 11, 12]:
        logits, past = dec.step(ids[:, start:end], past, mask[:, :end])
        got.append(logits)
        start = end
    got = torch.cat(got, dim=1)
    with torch.no_grad():
        for i, n in enumerate(pads):
            want = logits_fn(prog)(ids[i:i + 1, n:])[0]
            assert float((got[i, n:] - want).abs().max() / want.abs().max()) < TOL, i


def test_window_variant_and_unpadded_paths():
    """A sliding window (relative positions) works padded; an all-ones mask and no mask give
    the plain decoder's tokens without building a padded one."""
    prog = rw.rewrite(capture_lm("llama-sdpa"), "sparse:window=3")
    dec = prog.decoder()
    rows = prompts([7, 2, 4])
    ids, mask = left_pad(rows)
    out = dec.generate(ids, NEW, attention_mask=mask)
    assert_rows_equal_alone(out, rows, lambda p: greedy_reference(prog, p, NEW))
    plain = prog.decoder()
    same = plain.generate(ids, NEW, attention_mask=torch.ones_like(ids))
    assert plain._padded_decoder is None
    assert torch.equal(same, plain.generate(ids, NEW))
    padded = dec.padded_decoder()
    assert not padded.bounded
    assert torch.equal(padded.generate(ids, NEW), same)


# --- negative ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_decoder():
    return capture_lm("llama-sdpa").decoder()


@pytest.mark.parametrize("mask, message", [
    ([[1, 1, 0], [1, 1, 1]], "left-padded"),  # right padding
    ([[1, 1], [1, 1]], "shape"),  # not [B, S]
    ([[0, 2, 1], [1, 1, 1]], "only 0"),
    ([[0, 0, 0], [1, 1, 1]], "pad after a token|no token"),
    ([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "dtype"),
], ids=["right-padding", "shape", "values", "empty-row", "float"])
def test_invalid_masks_are_refused(llama_decoder, mask, message):
    ids = zoo._ids(2, 3)
    with pytest.raises(AttentionMaskError, match=message) as info:
        llama_decoder.generate(ids, 2, attention_mask=torch.tensor(mask))
    assert "\n" not in str(info.value)


def test_position_dependent_sparsity_is_refused():
    """Sinks read absolute positions, which a row's pads shift: refused, in one line."""
    prog = rw.rewrite(capture_lm("llama-sdpa"), "sparse:window=3,sink=1")
    with pytest.raises(DecoderError, match="absolute positions") as info:
        build_decoder(prog, padded=True)
    assert "\n" not in str(info.value)


def test_unpadded_decoder_refuses_a_step_mask(llama_decoder):
    with pytest.raises(DecoderError, match="padded=True"):
        llama_decoder.step(zoo._ids(2, 3), llama_decoder.empty_cache(2),
                           torch.ones(2, 3, dtype=torch.long))


# --- SmolLM2 -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_batched_generation():
    """The real checkpoint (GQA 9/3, RoPE): prompts of different lengths, left-padded with the
    tokenizer, generate what each generates alone."""
    from rewriter.models import load

    loaded = load("smollm2-135m")
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    prog = rw.capture(loaded.model, (ids,), {"use_cache": False})
    dec = prog.decoder(padded=True)
    texts = ["The history of the city begins with a small harbour town that grew",
             "Water boils at", "In 1905, Albert Einstein published"]
    tok = loaded.tokenizer
    rows = [tok(t, return_tensors="pt")["input_ids"][0] for t in texts]
    batch, mask = left_pad(rows, pad_id=tok.pad_token_id or 0)
    out = dec.generate(batch, NEW, attention_mask=mask)
    assert_rows_equal_alone(out, rows, lambda p: dec.generate(p, NEW))
