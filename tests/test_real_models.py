"""The real checkpoints shipped on these machines: SmolLM2-135M (Llama, GQA 9/3, RoPE) and
all-MiniLM-L6-v2 (BERT encoder). Each is loaded and captured once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from attn_testlib import TOL, canonical_nodes, noise_tolerance

import rewriter as rw
from rewriter.models import load

pytestmark = pytest.mark.slow

CAPTURE_SEQ = 16
LENGTHS = [CAPTURE_SEQ, 33, 70]


@dataclass
class Real:
    loaded: object
    prog: rw.Program


@functools.cache
def _real(name: str) -> Real:
    loaded = load(name)
    args, kwargs = loaded.example_inputs(CAPTURE_SEQ, 2)
    return Real(loaded, rw.capture(loaded.model, args, kwargs))


@pytest.fixture(scope="module")
def smollm():
    return _real("smollm2-135m")


@pytest.fixture(scope="module")
def minilm():
    return _real("minilm-l6")


def test_smollm2_sites(smollm):
    sites = smollm.prog.sites
    assert len(sites) == 30
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites} == {(9, 3, 64)}
    assert {s.positional for s in sites} == {"rope"}
    assert {s.kv_expansion for s in sites} == {"repeat_kv"}
    assert [s.layer for s in sites] == list(range(30))
    assert all(s.q_proj is not None and s.q_proj.weight.endswith("self_attn.q_proj.weight")
               for s in sites)
    assert all(s.o_proj is not None for s in sites)
    assert all("causal" in s.mask for s in sites)
    assert len(canonical_nodes(smollm.prog)) == 30


@pytest.mark.parametrize("seq", LENGTHS)
def test_smollm2_identity(smollm, seq):
    args, kwargs = smollm.loaded.example_inputs(seq, 2)
    report = smollm.prog.verify(smollm.loaded.model, args, kwargs)
    assert report.max_rel <= TOL, str(report)


def test_smollm2_canonicalization_is_exact_in_float64(smollm):
    """Canonicalized against captured graph in float64: rounding (~1e-15) cannot hide a
    difference, nor fake one."""
    report = smollm.prog.verify(float64=True)
    assert report.ok and report.max_rel < 1e-12, str(report)


def test_smollm2_tied_embeddings_in_hf_checkpoint(smollm, tmp_path):
    """SmolLM2 ties its LM head to the input embeddings: a uniform GQA conversion keeps the
    tie through rewrite, save and load, and writes hf/ that vanilla transformers loads (tied,
    one stored copy) with the program's logits, to within the program's fp32 noise."""
    from transformers import AutoModelForCausalLM

    new = rw.rewrite(smollm.prog, "gqa:kv-heads=1,merge=mean")
    manifest = new.save(tmp_path / "out")
    assert manifest["hf"] == {"written": True, "reason": "num_key_value_heads=1"}
    assert [sorted(g) for g in manifest["tied"]] == [["lm_head.weight",
                                                       "model.embed_tokens.weight"]]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert hf.config.num_key_value_heads == 1
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    args, kwargs = smollm.loaded.example_inputs(33, 2)
    report = new.verify(hf, args, kwargs, tolerance=noise_tolerance(new.module, args, kwargs, TOL))
    assert report.ok, str(report)
    loaded = rw.load(tmp_path / "out")
    state = loaded.module.state_dict(keep_vars=True)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert loaded.verify(new, args, kwargs, tolerance=0.0).ok  # the same graph and weights


def test_smollm2_eager_attention_identity(smollm):
    """The same weights with transformers' eager attention (matmul + softmax)."""
    model = smollm.loaded.model
    model.set_attn_implementation("eager")
    try:
        args, kwargs = smollm.loaded.example_inputs(CAPTURE_SEQ, 2)
        prog = rw.capture(model, args, kwargs)
        assert len(prog.sites) == 30
        assert {(s.pattern, s.num_heads, s.num_kv_heads, s.head_dim, s.kv_expansion)
                for s in prog.sites} == {("matmul-softmax", 9, 3, 64, "repeat_kv")}
        for seq in (CAPTURE_SEQ, 33):
            args, kwargs = smollm.loaded.example_inputs(seq, 2)
            report = prog.verify(model, args, kwargs)
            assert report.max_rel <= TOL, f"seq {seq}: {report}"
    finally:
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_minilm_sites(minilm):
    sites = minilm.prog.sites
    assert len(sites) == 6
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites} == {(12, 12, 32)}
    assert [s.layer for s in sites] == list(range(6))
    assert {s.positional for s in sites} == {"none"}
    assert not any(s.is_causal or s.cross for s in sites)
    assert all(s.q_proj.weight.endswith("attention.self.query.weight") for s in sites)
    assert len(canonical_nodes(minilm.prog)) == 6


@pytest.mark.parametrize("seq", LENGTHS)
def test_minilm_identity(minilm, seq):
    args, kwargs = minilm.loaded.example_inputs(seq, 2)
    report = minilm.prog.verify(minilm.loaded.model, args, kwargs)
    assert report.max_rel <= TOL, str(report)


def test_minilm_padding_identity(minilm):
    """A padded batch (attention_mask with zeros) through the canonical graph."""
    args, kwargs = minilm.loaded.example_inputs(CAPTURE_SEQ, 3)
    mask = kwargs["attention_mask"].clone()
    mask[0, -5:] = 0
    kwargs = {**kwargs, "attention_mask": mask}
    with torch.no_grad():
        want = minilm.loaded.model(*args, **kwargs).last_hidden_state
        got = minilm.prog.module(*args, **kwargs)
    got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * float(want.abs().max()))


def _windows(loaded, seq: int, count: int, held_out: bool) -> list[torch.Tensor]:
    from rewriter.analysis.quality import eval_windows
    from rewriter.io.text import token_windows

    ids = eval_windows(loaded.tokenizer, seq, count) if held_out \
        else token_windows(loaded.tokenizer, seq, count)
    return list(ids.split(1))


def test_smollm2_heal_repairs_mqa_on_held_out_text(smollm):
    """MQA (fit), healed for 8 steps on calibration text, is closer to the dense model (mean
    next-token KL) on held-out text it never saw (measured: 1.66 -> 1.00)."""
    from rewriter.analysis.quality import calibration_loss

    calib = _windows(smollm.loaded, 128, 8, held_out=False)
    held = [smollm.prog.call_with_tokens(ids) for ids in _windows(smollm.loaded, 128, 2, True)]
    mqa = rw.rewrite(smollm.prog, "gqa:kv-heads=1", calibration=calib[:2])
    healed = rw.rewrite(mqa, "heal:steps=8", calibration=calib)
    before, after = (calibration_loss(p, smollm.prog, held) for p in (mqa, healed))
    assert after < 0.8 * before, (before, after)
    log = healed.manifest["passes"][-1]["heal"]
    assert len(log["local"]["blocks"]) == 30 and log["kd"]["steps"] == 4


def test_minilm_heal_brings_embeddings_back(minilm):
    """12 -> 4 KV heads by mean pooling, healed layer by layer: held-out sentence embeddings
    move back toward the dense model's (measured: cosine 0.54 -> 0.68)."""
    from rewriter.analysis.quality import sentence_embeddings

    calib = _windows(minilm.loaded, 64, 8, held_out=False)
    held = torch.cat(_windows(minilm.loaded, 64, 8, held_out=True))
    gqa = rw.rewrite(minilm.prog, "gqa:kv-heads=4,merge=mean")
    healed = rw.rewrite(gqa, "heal:steps=16,objective=local,lr=1e-3", calibration=calib)

    dense = sentence_embeddings(minilm.prog, held)
    cos = [float(torch.nn.functional.cosine_similarity(sentence_embeddings(p, held),
                                                       dense).mean()) for p in (gqa, healed)]
    assert cos[1] > cos[0] + 0.05, cos


def test_calibration_from_a_short_text_takes_every_whole_window(minilm):
    """heal asks for many windows; a user's text gives as many whole ones as it holds, and one
    shorter than a window is a one-line SpecError."""
    from rewriter.api import calibration_batches

    prog = minilm.prog.clone()
    prog.tokenizer = minilm.loaded.tokenizer
    text = "Attention relates every token to every other token. " * 40
    tokens = len(minilm.loaded.tokenizer(text, add_special_tokens=False).input_ids)
    batches = calibration_batches(prog, text, seq_len=64, batches=1000)
    assert len(batches) == tokens // 64 and 0 < len(batches) < 1000
    assert batches[0][1]["input_ids"].shape == (1, 64)
    with pytest.raises(rw.SpecError, match="shorter than one window of 64 tokens"):
        calibration_batches(prog, "too short", seq_len=64)
