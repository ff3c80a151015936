"""Models with their own sliding window (found at capture: tests/test_native_windows.py) as ONNX
decoders: greedy tokens in ONNX Runtime equal the model's own ``generate`` past the window,
with the bounded cache (past_length in, present_length out) on the sliding layers."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.export import export_decoder

pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")


@pytest.mark.parametrize("name, target", [("gemma2-eager", "ort"), ("mistral-sdpa", "onnx")])
def test_generation_equals_model_generate(name, target, tmp_path):
    build, sparsity = zoo.SLIDING[name]
    model = build()
    prog = rw.capture(model, (zoo._ids(2, 9),), {"use_cache": False})
    assert [s.sparsity for s in prog.sites] == sparsity
    dec = prog.decoder()
    rows = export_decoder(dec, tmp_path / "d.onnx", target)
    bounds = {r["bound"] for r, s in zip(rows, sparsity, strict=True) if s}
    assert bounds == {zoo.SLIDING_WINDOW - 1}
    prompt = zoo._ids(2, 6, seed=3)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=3 * zoo.SLIDING_WINDOW, do_sample=False,
                              pad_token_id=0)
    sess = rwonnx.session(tmp_path / "d.onnx", threads=1)
    assert torch.equal(rwonnx.generate(sess, prompt, 3 * zoo.SLIDING_WINDOW), want)
