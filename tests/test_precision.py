"""rewriter.ir.precision: float64 re-runs that separate a wrong transform from fp32 rounding.

Positive: a promoted graph computes in float64 throughout (its dtype constants and weights),
equals the fp32 run to fp32 rounding, and an identity rewrite verifies at EXACT_TOLERANCE.
Negative: a deliberately wrong graph (a changed scale) fails the float64 check by orders of
magnitude. Tied weights keep both names in promoted and cloned modules."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.ir.graph import graph_module_over, tensor_aliases
from rewriter.ir.precision import EXACT_TOLERANCE, float64_module, rounding_noise, to_float64

zoo = pytest.importorskip("zoo")

ATTENTION = torch.ops.rewriter.attention.default


def capture_llama() -> rw.Program:
    return rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 9),), {"use_cache": False})


def test_promoted_graph_runs_in_float64():
    prog = capture_llama()
    promoted = float64_module(prog.module)
    narrow = [n for n in promoted.graph.nodes
              if any(a in (torch.float32, torch.float16, torch.bfloat16)
                     for a in (*n.args, *n.kwargs.values()))]
    assert narrow == []
    assert all(t.dtype != torch.float32 for t in promoted.state_dict().values())
    ids = zoo._ids(2, 9, seed=2)
    with torch.no_grad():
        low = prog.module(ids, use_cache=False).logits
        high = promoted(ids, use_cache=False).logits
    assert high.dtype == torch.float64
    assert float((low.double() - high).abs().max() / high.abs().max()) < 1e-5
    # the original module is untouched
    assert all(p.dtype == torch.float32 for p in prog.module.parameters())


def test_identity_verifies_exactly_in_float64():
    prog = capture_llama()
    report = prog.verify(float64=True)
    assert report.ok and report.tolerance == EXACT_TOLERANCE
    assert report.max_rel < 1e-12, str(report)
    assert "float64" in str(report)


def test_wrong_graph_fails_float64_check():
    """A scale off by 1 % is far above the float64 tolerance (and the report says so)."""
    prog = capture_llama()
    node = next(n for n in prog.module.graph.nodes if n.target is ATTENTION)
    node.kwargs = {**node.kwargs, "scale": node.kwargs["scale"] * 1.01}
    prog.module.recompile()
    report = prog.verify(float64=True)
    assert not report.ok
    assert report.max_rel > 1e3 * EXACT_TOLERANCE


def test_rounding_noise_is_fp32_level():
    prog = capture_llama()
    noise = rounding_noise(prog.module, (zoo._ids(2, 9),), {"use_cache": False})
    assert 0 < noise < 1e-5


def test_to_float64_keeps_integers():
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)
    (a,), kw = to_float64(((ids,), {"mask": mask, "flag": True}))
    assert a.dtype == torch.long and kw["mask"].dtype == torch.float64 and kw["flag"] is True


def tied_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def test_tied_weights_keep_both_names():
    model = tied_llama()
    prog = rw.capture(model, (zoo._ids(2, 8),), {"use_cache": False})
    groups = [sorted(n) for n in tensor_aliases(prog.module).values() if len(n) > 1]
    assert groups == [["lm_head.weight", "model.embed_tokens.weight"]]
    for module in (graph_module_over(prog.module, prog.module.graph),
                   rw.rewrite(prog, "gqa:kv-heads=1,merge=mean").module):
        state = module.state_dict(keep_vars=True)
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    promoted = float64_module(prog.module)
    state = promoted.state_dict(keep_vars=True)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert state["lm_head.weight"].dtype == torch.float64
