"""Program.save / rewriter.load: atomic directories, round trips, and hf/ checkpoints that
vanilla transformers loads with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
import zoo
from transformers import AutoModelForCausalLM

import rewriter as rw
from rewriter.io.atomic import OutputExistsError


@pytest.fixture(scope="module")
def llama():
    entry = zoo.get("llama-eager")
    model = entry.build()
    return entry, model, rw.capture(model, *entry.inputs(2, 7))


def test_save_load_round_trip(tmp_path, llama):
    entry, model, prog = llama
    new = rw.rewrite(prog, ["gqa:kv-heads=1,merge=mean", "sparse:window=3,sink=1"])
    manifest = new.save(tmp_path / "out", verification=new.verify(prog))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["inputs.safetensors", "manifest.json", "program.pt2", "weights.safetensors"]
    assert manifest["hf"]["written"] is False and "sparse" in manifest["hf"]["reason"]
    loaded = rw.load(tmp_path / "out")
    assert [s.sparsity for s in loaded.sites] == [s.sparsity for s in new.sites]
    assert [s.num_kv_heads for s in loaded.sites] == [1, 1]
    for args, kwargs in [entry.inputs(2, 7), entry.inputs(3, 11)]:
        assert loaded.verify(new, args, kwargs).max_rel <= 1e-6
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p["spec"] for p in on_disk["passes"]][-2:] == \
        ["gqa:kv-heads=1,merge=mean", "sparse:window=3,sink=1"]
    assert on_disk["verification"]["ok"] is False  # a variant: it reports its error
    # a loaded program can be rewritten further
    again = rw.rewrite(loaded, "sparse:window=2,layers=0")
    assert again.sites[0].sparsity == "window=2" and again.sites[1].sparsity == "window=3,sink=1"
    assert again.verify(loaded).max_rel > 1e-4


def test_uniform_gqa_writes_a_transformers_checkpoint(tmp_path, llama):
    entry, model, prog = llama
    new = rw.rewrite(prog, "gqa:kv-heads=1,merge=mean")
    manifest = new.save(tmp_path / "gqa")
    assert manifest["hf"] == {"written": True, "reason": "num_key_value_heads=1"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa" / "hf")
    assert hf.config.num_key_value_heads == 1
    for args, kwargs in [entry.inputs(2, 7), entry.inputs(3, 12)]:
        want = new(*args, **kwargs).logits
        got = hf(**kwargs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_layer_heads_are_saved_as_pt2_only_with_the_reason(tmp_path, llama):
    _, _, prog = llama
    new = rw.rewrite(prog, "prune-heads:heads=0.0;0.1")
    manifest = new.save(tmp_path / "pruned")
    assert not (tmp_path / "pruned" / "hf").exists()
    assert "per-layer head counts" in manifest["hf"]["reason"]


def test_existing_output_is_refused_and_untouched(tmp_path, llama):
    _, _, prog = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        prog.save(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    prog.save(out, force=True)
    assert (out / "program.pt2").exists() and not (out / "keep.txt").exists()


def test_failed_write_leaves_nothing(tmp_path, llama, monkeypatch):
    _, _, prog = llama
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        prog.save(out)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory


def test_loading_something_else_is_a_clear_error(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(rw.ModelLoadError, match="not a saved program"):
        rw.load(tmp_path / "junk")
    (tmp_path / "junk" / "program.pt2").write_bytes(b"not a zip")
    (tmp_path / "junk" / "manifest.json").write_text("{}")
    with pytest.raises(rw.ModelLoadError, match="cannot read"):
        rw.load(tmp_path / "junk")


# --- tied weights (an LM head sharing the input embedding, as SmolLM2 does) -----------------


@pytest.fixture(scope="module")
def tied():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return rw.capture(model, (zoo._ids(2, 7),), {"use_cache": False})


def _is_tied(module: torch.nn.Module) -> bool:
    state = module.state_dict(keep_vars=True)
    return state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_tied_weights_survive_rewrite_save_load_and_hf(tmp_path, tied):
    new = rw.rewrite(tied, "gqa:kv-heads=1,merge=mean")
    assert _is_tied(new.module)
    manifest = new.save(tmp_path / "out")
    assert manifest["hf"] == {"written": True, "reason": "num_key_value_heads=1"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "hf" / "model.safetensors"), "pt") as f:
        stored = [k for k in f.keys() if k in ("lm_head.weight", "model.embed_tokens.weight")]
    assert len(stored) == 1  # the tied weight is stored once
    ids = zoo._ids(3, 12, seed=4)
    want = new(ids, use_cache=False).logits
    torch.testing.assert_close(hf(ids).logits, want, rtol=1e-5, atol=1e-5)
    loaded = rw.load(tmp_path / "out")
    assert _is_tied(loaded.module)
    assert loaded.parameter_count() == new.parameter_count()
    torch.testing.assert_close(loaded(ids, use_cache=False).logits, want, rtol=0, atol=0)


def test_tied_weights_in_onnx_and_decoders(tmp_path, tied):
    import onnx

    new = rw.rewrite(tied, "gqa:kv-heads=1,merge=mean")
    new.export_onnx(tmp_path / "m.onnx", "ort")
    model = onnx.load(str(tmp_path / "m.onnx"))
    embeddings = [i.name for i in model.graph.initializer if list(i.dims) == [zoo.VOCAB, 32]]
    assert len(embeddings) == 1, embeddings  # one initializer for both uses
    dec = new.decoder()
    prompt = zoo._ids(1, 4, seed=2)
    from rewriter.decoder import greedy_reference

    assert torch.equal(dec.generate(prompt, 6), greedy_reference(new, prompt, 6))


def test_hf_that_cannot_be_written_does_not_sink_the_save(tmp_path, llama, monkeypatch):
    """program.pt2 is the result; an hf/ the writer refuses is reported, not fatal."""
    import rewriter.checkpoint as ckpt

    def refuse(program, directory, weights, expected):
        directory.mkdir()
        (directory / "partial").write_text("x")
        raise rw.RewriterError("cannot write hf/: no room for it")

    monkeypatch.setattr(ckpt, "write_hf", refuse)
    _, _, prog = llama
    manifest = rw.rewrite(prog, "gqa:kv-heads=1,merge=mean").save(tmp_path / "out")
    assert manifest["hf"] == {"written": False, "reason": "cannot write hf/: no room for it"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["inputs.safetensors", "manifest.json", "program.pt2", "weights.safetensors"]
