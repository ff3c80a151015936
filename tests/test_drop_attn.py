"""drop-attn: whole attention sublayers removed, the residual path kept.

Exactness: dropping a sublayer equals the model with that sublayer's output projection zeroed
(its output then adds nothing to the residual stream), on pre-norm (Llama, GPT-2 with a
Conv1D bias) and post-norm (BERT) models. Scores pick the sublayer that contributes nothing.
"""

from __future__ import annotations

import pytest
import torch
import zoo

import rewriter as rw
from rewriter.errors import SpecError

TOL = 1e-5
OUT_PROJ = {  # zoo name -> (attention module of layer i, its output projection's name)
    "llama-sdpa": (lambda m, i: m.model.layers[i].self_attn, "o_proj"),
    "gpt2-eager": (lambda m, i: m.transformer.h[i].attn, "c_proj"),
    "bert-sdpa": (lambda m, i: m.encoder.layer[i].attention.output, "dense"),
}


def _calibration(seq: int = 16, batches: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 100, (1, seq), generator=g) for _ in range(batches)]


def _silence(model, name: str, layer: int) -> None:
    """Zero layer ``layer``'s attention output projection (weight and bias)."""
    get, attr = OUT_PROJ[name]
    proj = getattr(get(model, layer), attr)
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


@pytest.mark.parametrize("name", list(OUT_PROJ))
def test_dropping_a_layer_equals_zeroing_its_output_projection(name):
    entry = zoo.get(name)
    model = entry.build()
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, "drop-attn:layers=1")
    assert [s.index for s in new.sites] == [0]
    info = new.manifest["passes"][-1]
    assert info["dropped"] == [1] and info["dropped_layers"] == [1]
    assert info["parameters_freed"] > 0
    # the q/k/v/o projections of layer 1 are gone from the program
    assert prog.parameter_count() - new.parameter_count() == info["parameters_freed"]
    silenced = entry.build()
    _silence(silenced, name, 1)
    for a, k in [(args, kwargs), entry.inputs(1, 11)]:
        assert new.verify(silenced, a, k).max_rel <= TOL


@pytest.mark.parametrize("score", ["cosine", "gradient"])
def test_scores_drop_the_sublayer_that_adds_nothing(score):
    entry = zoo.get("llama-sdpa")
    model = entry.build()
    _silence(model, "llama-sdpa", 0)  # layer 0's attention contributes exactly nothing
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, f"drop-attn:ratio=0.5,score={score}", calibration=_calibration())
    info = new.manifest["passes"][-1]
    assert info["dropped"] == [0] and info["score"] == score
    assert info["scores"][0] == pytest.approx(0.0, abs=1e-12)
    assert info["scores"][1] > 1e-6
    assert new.verify(model, args, kwargs).max_rel <= TOL


def test_cosine_is_the_default_score():
    entry = zoo.get("llama-sdpa")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    new = rw.rewrite(prog, "drop-attn:ratio=0.5", calibration=_calibration())
    assert new.manifest["passes"][-1]["score"] == "cosine"


def test_dropped_model_decodes_and_shrinks_the_cache():
    from rewriter.decoder import greedy_reference

    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 9),), {"use_cache": False})
    new = rw.rewrite(prog, "drop-attn:layers=0")
    dec = new.decoder()
    assert len(dec.cache) == 2  # one K and one V entry: layer 1's
    prompt = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(dec.generate(prompt, 6), greedy_reference(new, prompt, 6))
    before, after = new.manifest["passes"][-1]["kv_cache_bytes_per_token"]
    assert after * 2 == before


@pytest.mark.parametrize("spec, message", [
    ("drop-attn", "exactly one of ratio=R or layers=L"),
    ("drop-attn:ratio=0.5,layers=1", "exactly one of ratio=R or layers=L"),
    ("drop-attn:layers=1,score=cosine", "score= only goes with ratio=R"),
    ("drop-attn:layers=7", "no attention in layer(s) [7]"),
    ("drop-attn:layers=0-1", "would drop every attention site"),
    ("drop-attn:ratio=1.5", "a fraction in (0, 1)"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    entry = zoo.get("llama-sdpa")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        rw.rewrite(prog, spec, calibration=_calibration())


def test_a_shared_kv_source_is_not_dropped():
    entry = zoo.get("llama-sdpa")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    shared = rw.rewrite(prog, "share-kv:group=2")
    with pytest.raises(SpecError, match="read by other sites"):
        rw.rewrite(shared, "drop-attn:layers=0")
    new = rw.rewrite(shared, "drop-attn:layers=1")  # the reader can go
    assert [s.index for s in new.sites] == [0]


def test_gradient_score_needs_a_language_model():
    entry = zoo.get("bert-sdpa")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    with pytest.raises(SpecError, match="needs a language model"):
        rw.rewrite(prog, "drop-attn:ratio=0.5,score=gradient",
                   calibration=[entry.inputs(1, 12) for _ in range(2)])
