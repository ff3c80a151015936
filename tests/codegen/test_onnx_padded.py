"""Padded ONNX decoders (export with kv_cache=True, padded=True): the attention_mask input
[batch, total_sequence] reaches every site (Attention / the decomposition with a bool mask,
GroupQueryAttention with the pads in attention_bias), and batched greedy generation of
left-padded prompts in ONNX Runtime equals PyTorch's and each prompt alone, on zoo Llama,
GPT-2 and OPT, for both targets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.export import export_decoder
from rewriter.decoder import build_decoder
from rewriter.errors import RewriterError
from rewriter.ir.padding import AttentionMaskError

pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-4
NEW = 8


def capture_lm(name: str) -> rw.Program:
    return rw.capture(zoo.get(name).build(), (zoo._ids(2, 9),), {"use_cache": False})


def left_pad(lengths=(6, 3, 1, 5), seed: int = 0):
    rows = [zoo._ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return rows, ids, mask


_DECODERS: dict = {}


def padded_decoder(name: str):
    if name not in _DECODERS:
        _DECODERS[name] = build_decoder(capture_lm(name), padded=True)
    return _DECODERS[name]


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [("llama-sdpa", "onnx", False), ("llama-sdpa", "onnx", True),
         ("llama-sdpa", "ort", False), ("gpt2-eager", "onnx", False),
         ("gpt2-eager", "ort", False), ("opt-sdpa", "ort", False)]


@pytest.mark.parametrize("name, target, decompose", CASES,
                         ids=[f"{n}-{t}{'-decomposed' if d else ''}" for n, t, d in CASES])
def test_padded_generation_in_onnx_runtime(tmp_path, name, target, decompose):
    dec = padded_decoder(name)
    path = tmp_path / "decoder.onnx"
    rows = export_decoder(dec, path, target, decompose=decompose)
    onnx.checker.check_model(str(path))
    assert {r["op"] for r in rows} == {"decomposed" if decompose else
                                       "GroupQueryAttention" if target == "ort" else "Attention"}
    sess = rwonnx.session(path, threads=1)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert list(inputs)[-1] == "attention_mask"
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    prompts, ids, mask = left_pad()
    # step logits: ONNX Runtime == the torch padded decoder (prefill, then one-token steps)
    names = dec.input_names[1:-1]
    ort_past = [t.numpy() for t in dec.empty_cache(ids.shape[0])]
    torch_past = dec.empty_cache(ids.shape[0])
    full = torch.cat([ids, zoo._ids(ids.shape[0], 2, seed=9)], dim=1)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], 2, dtype=torch.long)], dim=1)
    start = 0
    for end in [ids.shape[1], ids.shape[1] + 1, ids.shape[1] + 2]:
        chunk = full[:, start:end]
        logits, *ort_past = sess.run(None, {"input_ids": chunk.numpy(),
                                            **dict(zip(names, ort_past, strict=True)),
                                            "attention_mask": full_mask[:, :end].numpy()})
        want, torch_past = dec.step(chunk, torch_past, full_mask[:, :end])
        real = full_mask[:, start:end].bool().numpy()
        assert rel_err(logits[real], want.numpy()[real]) < TOL, f"logits at {start}:{end}"
        start = end
    # greedy tokens: == PyTorch's padded generation, == each prompt alone in ONNX Runtime
    got = rwonnx.generate(sess, ids, NEW, attention_mask=mask)
    assert torch.equal(got, dec.generate(ids, NEW, attention_mask=mask))
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = rwonnx.generate(sess, p[None], NEW)
        assert torch.equal(got[i, width:], alone[0, len(p):]), f"row {i}"


def test_unpadded_onnx_decoder_refuses_pads(tmp_path):
    """A decoder exported without padded=True has no attention_mask: a mask with pads is a
    one-line error, an all-ones mask changes nothing."""
    prog = capture_lm("llama-sdpa")
    path = tmp_path / "decoder.onnx"
    prog.export_onnx(path, target="onnx", kv_cache=True)
    sess = rwonnx.session(path, threads=1)
    assert "attention_mask" not in [i.name for i in sess.get_inputs()]
    _, ids, mask = left_pad()
    with pytest.raises(AttentionMaskError, match="padded=True") as info:
        rwonnx.generate(sess, ids, 2, attention_mask=mask)
    assert "\n" not in str(info.value)
    assert torch.equal(rwonnx.generate(sess, ids, 2, attention_mask=torch.ones_like(ids)),
                       rwonnx.generate(sess, ids, 2))
    with pytest.raises(AttentionMaskError, match="left-padded"):
        rwonnx.generate(sess, ids, 2, attention_mask=mask.flip(1))
    with pytest.raises(RewriterError, match="kv_cache=True"):
        prog.export_onnx(tmp_path / "x.onnx", target="onnx", padded=True)


@pytest.mark.slow
def test_smollm2_padded_generation_in_onnx_runtime(tmp_path):
    """The real checkpoint on GroupQueryAttention: tokenizer prompts of three lengths,
    left-padded, generate in ONNX Runtime what each generates alone there."""
    from rewriter.models import load

    loaded = load("smollm2-135m")
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    prog = rw.capture(loaded.model, (ids,), {"use_cache": False})
    path = tmp_path / "decoder.onnx"
    prog.export_onnx(path, target="ort", kv_cache=True, padded=True)
    sess = rwonnx.session(path)
    tok = loaded.tokenizer
    prompts = [tok(t, return_tensors="pt")["input_ids"][0] for t in
               ["The history of the city begins with a small harbour town that grew",
                "Water boils at", "In 1905, Albert Einstein published"]]
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    got = rwonnx.generate(sess, batch, NEW, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = rwonnx.generate(sess, p[None], NEW)
        assert torch.equal(got[i, width:], alone[0, len(p):]), f"row {i}"
