"""Logits for the last position only (rewriter.passes.last_position, Decoder.last_logits_only).

Positive: zoo decoders (a plain LM head, GPT-2's tied head, Gemma2's soft-capped logits) keep
one row and step, generate and cache exactly as the full decoder does. Negative: logits that
are not a position-wise function of one projection (a cumulative sum, another input mixed in,
the head's input read elsewhere) are refused with one line and leave the graph as it was.
Numeric: the last row equals the full decoder's in fp32 on prompts and single steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewriter as rw
from rewriter.decoder import DecoderError, build_decoder
from rewriter.passes.last_position import LastPositionError, keep_last_position

zoo = pytest.importorskip("zoo")


def decoder(name: str):
    prog = rw.capture(zoo.get(name).build(), (zoo._ids(2, 9),), {"use_cache": False})
    return build_decoder(prog)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2-eager", "gemma2-eager"])
def test_last_row_equals_full_decoder(name):
    full = decoder(name)
    last = full.last_logits_only()
    assert last.last_logits and not full.last_logits
    assert last.last_logits_only() is last
    ids = zoo._ids(2, 7, seed=3)
    past_full, past_last = full.empty_cache(2), last.empty_cache(2)
    for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):  # prefill, then one-token steps
        want, past_full = full.step(chunk, past_full)
        got, past_last = last.step(chunk, past_last)
        assert got.shape == (2, 1, want.shape[-1])
        assert rel_err(got, want[:, -1:]) < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(past_last, past_full, strict=True))
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(last.generate(prompt, 6), full.generate(prompt, 6))


def test_the_projection_runs_on_one_row():
    """The inserted slice keeps the last position and feeds the LM head, nothing else."""
    last = decoder("llama-sdpa").last_logits_only()
    head = next(n for n in last.module.graph.nodes if n.target == torch.ops.aten.linear.default
                and "lm_head" in str(n.args[1]))
    cut = head.args[0]
    assert cut.target == torch.ops.aten.slice.Tensor and tuple(cut.args[1:3]) == (1, -1)
    assert list(cut.users) == [head]


class _Head(nn.Module):
    """A stand-in LM: embedding, then ``tail`` after the head's projection."""

    def __init__(self, tail: str):
        super().__init__()
        self.embed, self.head, self.tail = nn.Embedding(10, 8), nn.Linear(8, 10), tail

    def forward(self, ids):
        h = self.embed(ids)
        logits = self.head(h)
        if self.tail == "cumsum":  # mixes positions
            return logits.cumsum(1)
        if self.tail == "plus-input":  # another input-dependent tensor
            return logits + h.sum(-1, keepdim=True)
        if self.tail == "read-elsewhere":  # the head's output is a second output too
            return logits * 2.0, logits
        if self.tail == "softcap":
            return torch.tanh(logits / 30.0) * 30.0
        return logits


def _exported(tail: str):
    ids = torch.randint(0, 10, (2, 5))
    seq = torch.export.Dim("seq", min=2)
    ep = torch.export.export(_Head(tail).eval(), (ids,), dynamic_shapes=({1: seq},))
    return ep.module(), ids


@pytest.mark.parametrize("tail, why", [("cumsum", "not known to act on each position"),
                                       ("plus-input", "another input-dependent tensor"),
                                       ("read-elsewhere", "read elsewhere")])
def test_refuses_logits_that_are_not_position_wise(tail, why):
    module, ids = _exported(tail)
    before = module.code
    with pytest.raises(LastPositionError, match=why):
        keep_last_position(module)
    assert module.code == before


def test_position_wise_tail_keeps_the_last_row():
    module, ids = _exported("softcap")
    with torch.no_grad():
        want = module(ids)
    keep_last_position(module)
    with torch.no_grad():
        got = module(ids)
    assert got.shape == (2, 1, 10)
    assert rel_err(got, want[:, -1:]) < 1e-6


def test_decoder_refusal_is_one_line(monkeypatch):
    import rewriter.decoder as decoder_mod

    def refuse(module):
        raise LastPositionError("no projection found")

    monkeypatch.setattr(decoder_mod, "keep_last_position", refuse)
    full = decoder("llama-sdpa")
    with pytest.raises(DecoderError, match="cannot keep only the last position's logits: no "
                       "projection found") as info:
        full.last_logits_only()
    assert "\n" not in str(info.value)
