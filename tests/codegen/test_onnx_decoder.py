"""ONNX decoders with past/present KV inputs and outputs: ONNX Runtime (CPU) equals the torch
decoder step by step (fp32, relative 1e-4) and greedy generation in ONNX Runtime equals
PyTorch token for token: on zoo decoders and variants, and on SmolLM2 (dense and GQA) for 32
tokens."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.export import ExportError, export_decoder, manifest_path
from rewriter.decoder import build_decoder, greedy_reference

pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-4
# (target, decompose): standard Attention with its past inputs, the MatMul/Softmax
# decomposition over Concat, and com.microsoft.GroupQueryAttention with past inputs
MODES = [("onnx", False), ("onnx", True), ("ort", False)]
MODE_IDS = ["onnx", "onnx-decomposed", "ort"]


def capture_lm(name: str = "llama-sdpa") -> rw.Program:
    return rw.capture(zoo.get(name).build(), (zoo._ids(2, 9),), {"use_cache": False})


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare_steps(sess, dec, ids: torch.Tensor, cuts: list[int]) -> None:
    """Feed ``ids`` in chunks ending at ``cuts`` to ONNX Runtime and to the torch decoder,
    each with its own cache; logits and presents agree at every step."""
    names = dec.input_names[1:]
    ort_past = [t.numpy() for t in dec.empty_cache(ids.shape[0])]
    torch_past = dec.empty_cache(ids.shape[0])
    start = 0
    for end in [*cuts, ids.shape[1]]:
        chunk = ids[:, start:end]
        logits, *ort_past = sess.run(None, {"input_ids": chunk.numpy(),
                                            **dict(zip(names, ort_past, strict=True))})
        want, torch_past = dec.step(chunk, torch_past)
        assert rel_err(logits, want) < TOL, f"logits at tokens {start}:{end}"
        for got, ref in zip(ort_past, torch_past, strict=True):
            assert rel_err(got, ref) < TOL, f"present cache at tokens {start}:{end}"
        start = end


@pytest.fixture(scope="module")
def llama():
    prog = capture_lm()
    return prog, build_decoder(prog)


@pytest.mark.parametrize("target, decompose", MODES, ids=MODE_IDS)
def test_zoo_decoder_steps(llama, tmp_path, target, decompose):
    prog, dec = llama
    path = tmp_path / "decoder.onnx"
    rows = export_decoder(dec, path, target, decompose=decompose)
    onnx.checker.check_model(str(path))
    assert len(rows) == len(prog.sites) and all(r["kv_cache"] for r in rows)
    assert {r["op"] for r in rows} == {"decomposed" if decompose else
                                       "GroupQueryAttention" if target == "ort" else "Attention"}
    sess = rwonnx.session(path, threads=1)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_0"][0] == "batch" and inputs["past_key_0"][2] == "past_sequence"
    assert [o.name for o in sess.get_outputs()] == dec.output_names
    compare_steps(sess, dec, zoo._ids(2, 11, seed=3), [6, 7, 8, 9, 10])  # prefill, then steps
    compare_steps(sess, dec, zoo._ids(1, 11, seed=4), [4, 8])  # prefill, then chunks


@pytest.mark.parametrize("target, decompose", MODES, ids=MODE_IDS)
def test_zoo_generation(llama, tmp_path, target, decompose):
    prog, dec = llama
    export_decoder(dec, tmp_path / "d.onnx", target, decompose=decompose)
    sess = rwonnx.session(tmp_path / "d.onnx", threads=1)
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(rwonnx.generate(sess, prompt, 10), greedy_reference(prog, prompt, 10))


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("spec", ["sparse:window=3,sink=1", "sparse:window=4",
                                  "sparse:window=4,heads=0;2", "gqa:kv-heads=1,merge=mean",
                                  "share-kv:group=2", "share-attn:group=2",
                                  "prune-heads:heads=0.0;0.1;1.2;1.3"])
def test_variant_decoders(llama, tmp_path, spec, target):
    prog = rw.rewrite(llama[0], spec)
    dec = build_decoder(prog)
    rows = export_decoder(dec, tmp_path / "v.onnx", target)
    if target == "ort" and spec == "sparse:window=4":
        assert "local_window_size" in rows[0]["reason"]
    sess = rwonnx.session(tmp_path / "v.onnx", threads=1)
    compare_steps(sess, dec, zoo._ids(2, 12, seed=3), [6, 7, 8, 9, 10, 11])
    compare_steps(sess, dec, zoo._ids(1, 12, seed=4), [5, 9])


def test_batch_one_capture(tmp_path):
    """torch.export pins a batch of 1; the decoder and its export keep batch 1 fixed."""
    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(1, 9),), {"use_cache": False})
    dec = build_decoder(prog)
    assert dec.static_batch == 1
    export_decoder(dec, tmp_path / "d.onnx", "ort")
    sess = rwonnx.session(tmp_path / "d.onnx", threads=1)
    assert sess.get_inputs()[0].shape == [1, "sequence"]
    prompt = zoo._ids(1, 4, seed=5)
    assert torch.equal(rwonnx.generate(sess, prompt, 10), greedy_reference(prog, prompt, 10))


def test_manifest_lists_the_cache(llama, tmp_path):
    prog, dec = llama
    path = tmp_path / "d.onnx"
    prog.export_onnx(path, "ort", kv_cache=True)
    doc = json.loads(manifest_path(path).read_text())
    assert doc["inputs"] == dec.input_names and doc["outputs"] == dec.output_names
    assert [c["input"] for c in doc["cache"]] == dec.input_names[1:]
    assert doc["cache"][0]["kv_heads"] == prog.sites[0].num_kv_heads


def test_bad_target_leaves_no_file(llama, tmp_path):
    with pytest.raises(ExportError, match="unknown ONNX target"):
        export_decoder(llama[1], tmp_path / "d.onnx", "tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_generate_needs_a_decoder(tmp_path):
    prog = capture_lm()
    prog.export_onnx(tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match="not a decoder with a KV cache"):
        rwonnx.generate(rwonnx.session(tmp_path / "m.onnx"), zoo._ids(1, 3), 2)


# --- SmolLM2: 32 greedy tokens in ONNX Runtime == PyTorch ------------------------------------

PROMPT = "The capital of France is"


def smollm_generation(tmp_path, specs: list[str]) -> None:
    from rewriter.models import load

    loaded = load("smollm2-135m")
    prog = loaded.capture(16)
    if specs:
        prog = rw.rewrite(prog, specs)
    prompt = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    want = greedy_reference(prog, prompt, 32)  # the program, no cache, in PyTorch
    if not specs:  # the dense program is the Hugging Face model: its generate() agrees
        with torch.no_grad():  # (up to where it stops at end-of-sequence)
            hf = loaded.model.generate(prompt, max_new_tokens=32, do_sample=False,
                                       attention_mask=torch.ones_like(prompt))
        assert hf.shape[1] > prompt.shape[1] + 8
        assert torch.equal(hf, want[:, :hf.shape[1]])
    dec = build_decoder(prog)
    assert torch.equal(dec.generate(prompt, 32), want)
    for target in ("onnx", "ort"):
        path = tmp_path / f"{target}.onnx"
        export_decoder(dec, path, target)
        got = rwonnx.generate(rwonnx.session(path), prompt, 32)
        assert torch.equal(got, want), (target, got, want)


@pytest.mark.slow
def test_smollm2_dense_generation(tmp_path):
    smollm_generation(tmp_path, [])


@pytest.mark.slow
def test_smollm2_gqa_generation(tmp_path):
    smollm_generation(tmp_path, ["gqa:kv-heads=1"])
