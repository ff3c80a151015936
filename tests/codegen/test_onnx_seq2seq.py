"""Encoder-decoders in ONNX Runtime: the encoder and the cached decoder step exported as two
files (rewriter.codegen.onnx.export.export_seq2seq); greedy tokens equal ``model.generate``
on both targets."""

from __future__ import annotations

import json

import pytest
import torch
import zoo
from test_seq2seq import NEW_TOKENS, capture, encoder_inputs, hf_greedy

from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.export import encoder_path, manifest_path
from rewriter.codegen.ort.seq2seq import Seq2SeqSession
from rewriter.errors import RewriterError


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("arch", ["t5", "bart", "whisper"])
def test_onnx_greedy_equals_generate(arch, target, tmp_path):
    model, prog = capture(arch)
    path = tmp_path / "dec.onnx"
    rows = prog.export_onnx(path, target, kv_cache=True)
    assert encoder_path(path).is_file() and len(rows) == len(prog.sites)
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["metadata"]["rewriter.encoder"] == "dec.encoder.onnx"
    assert [c["input"] for c in manifest["cache"]][:2] == ["past_key_0", "past_value_0"]
    assert sum(i.startswith("cross_key_") for i in manifest["inputs"]) == zoo.LAYERS
    sess = rwonnx.session(path)
    assert isinstance(sess, Seq2SeqSession)
    inputs, kwargs = encoder_inputs(arch)
    want = hf_greedy(model, kwargs, NEW_TOKENS)
    got = rwonnx.generate(sess, inputs, NEW_TOKENS, kwargs.get("attention_mask"))
    assert torch.equal(got[:, -want.shape[1]:], want)


@pytest.mark.parametrize("arch", ["t5", "bart", "whisper"])
def test_last_position_logits(arch, tmp_path):
    """logits="last": the decoder step's logits are [B, 1, V] (T5's scaled tied head, BART's
    final_logits_bias, Whisper's proj_out); greedy tokens still equal ``model.generate``."""
    model, prog = capture(arch)
    path = tmp_path / "dec.onnx"
    prog.export_onnx(path, "ort", kv_cache=True, logits="last")
    assert json.loads(manifest_path(path).read_text())["logits"] == "last"
    sess = rwonnx.session(path)
    assert sess.decoder.get_outputs()[0].shape[1] == 1
    inputs, kwargs = encoder_inputs(arch)
    want = hf_greedy(model, kwargs, NEW_TOKENS)
    got = rwonnx.generate(sess, inputs, NEW_TOKENS, kwargs.get("attention_mask"))
    assert torch.equal(got[:, -want.shape[1]:], want)


def test_missing_encoder_file_is_one_line(tmp_path):
    _, prog = capture("bart")
    path = tmp_path / "dec.onnx"
    prog.export_onnx(path, "onnx", kv_cache=True)
    encoder_path(path).unlink()
    with pytest.raises(RewriterError, match="its encoder .* is missing"):
        rwonnx.session(path)
