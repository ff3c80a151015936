"""bfloat16 and float16 end to end (issue #15): capture, rewrite (calibration statistics and
fits in float32/float64), save, reload, decode and export keep the model's dtype and agree with
the same steps in float32 to within the half-precision rounding."""

from __future__ import annotations

import pytest
import torch
import zoo

import rewriter as rw
from rewriter.decoder import greedy_reference

HALF = [torch.bfloat16, torch.float16]
CALIB = [zoo._ids(2, 12, seed=s) for s in (11, 12)]
# one bf16 rounding is 2^-8 relative; through two layers and a softmax, outputs of order one
# differ from float32 by a few of those
HALF_TOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.fixture(scope="module")
def model32():
    return zoo.get("llama-sdpa").build()


@pytest.fixture(scope="module", params=HALF, ids=["bf16", "fp16"])
def half(request, model32):
    """(dtype, the model in it, its Program)."""
    dtype = request.param
    model = zoo.get("llama-sdpa").build().to(dtype)
    return dtype, model, rw.capture(model, (zoo._ids(2, 7),), {"use_cache": False})


def floating_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}


def logits(prog_or_model, ids):
    with torch.no_grad():
        return prog_or_model(ids, use_cache=False).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_capture_is_exact(half):
    """Canonicalization changes nothing: the program runs in the model's dtype and gives the
    model's logits bit for bit, at the capture shape and another."""
    dtype, model, prog = half
    ids = zoo._ids(3, 9, seed=2)
    assert logits(prog, ids).dtype == dtype
    assert torch.equal(logits(prog, ids), logits(model, ids))


@pytest.mark.parametrize("spec", ["gqa:kv-heads=1,merge=mean", "gqa:kv-heads=1,merge=fit",
                                  "prune-heads:ratio=0.5,score=gradient",
                                  "sparse:heads=auto,window=4,density=0.5,ctx=12",
                                  "share-kv:group=2"])
def test_rewrites_keep_the_dtype_and_match_float32(half, model32, spec):
    """A rewrite of the half model stays in its dtype and computes what the same rewrite of the
    float32 model computes, to half-precision rounding: calibration reads the same statistics
    (kept in float32) and makes the same choices."""
    dtype, _, prog = half
    prog32 = rw.capture(model32, (zoo._ids(2, 7),), {"use_cache": False})
    new = rw.rewrite(prog, spec, calibration=CALIB)
    new32 = rw.rewrite(prog32, spec, calibration=CALIB)
    assert floating_dtypes(new.module) == {dtype}
    assert [(s.num_heads, s.num_kv_heads, s.sparsity) for s in new.sites] == \
        [(s.num_heads, s.num_kv_heads, s.sparsity) for s in new32.sites]
    ids = zoo._ids(2, 10, seed=3)
    assert rel(logits(new, ids), logits(new32, ids)) < HALF_TOL[dtype]


def test_save_reload_decode(half, tmp_path):
    """Saved and reloaded bit for bit in the dtype; the KV-cache decoder generates what the
    program does token by token."""
    dtype, _, prog = half
    new = rw.rewrite(prog, ["gqa:kv-heads=1,merge=mean", "sparse:window=4,sink=1"])
    new.save(tmp_path / "out")
    loaded = rw.load(tmp_path / "out")
    assert floating_dtypes(loaded.module) == {dtype}
    ids = zoo._ids(2, 9, seed=4)
    assert torch.equal(logits(loaded, ids), logits(new, ids))
    prompt = zoo._ids(1, 5, seed=6)
    dec = loaded.decoder()
    assert torch.equal(dec.generate(prompt, 8), greedy_reference(loaded, prompt, 8))


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_float16_onnx_runs_in_onnx_runtime(tmp_path, target):
    """float16 programs export as float16 ONNX that ONNX Runtime's CPU provider runs: the
    prefill graph close to the program, the KV-cache decoder generating its tokens."""
    from rewriter import onnx as rwonnx

    model = zoo.get("llama-sdpa").build().to(torch.float16)
    prog = rw.capture(model, (zoo._ids(2, 7),), {"use_cache": False})
    rwonnx.export_onnx(prog, tmp_path / "m.onnx", target)
    sess = rwonnx.session(tmp_path / "m.onnx", threads=1)
    ids = zoo._ids(2, 9, seed=7)
    got = rwonnx.run(sess, ids, use_cache=False)[0]
    assert got.dtype == torch.float16
    assert rel(got, logits(prog, ids)) < HALF_TOL[torch.float16]
    rwonnx.export_onnx(prog, tmp_path / "d.onnx", target, kv_cache=True)
    prompt = zoo._ids(1, 5, seed=8)
    tokens = rwonnx.generate(rwonnx.session(tmp_path / "d.onnx", threads=1), prompt, 6)
    assert torch.equal(torch.as_tensor(tokens), greedy_reference(prog, prompt, 6))


def test_bfloat16_onnx_on_cpu_is_a_clear_error(tmp_path):
    """The export is valid ONNX (providers with bfloat16 kernels run it); ONNX Runtime's CPU
    provider has none, and the session says what to export instead."""
    import onnx

    from rewriter import onnx as rwonnx

    model = zoo.get("llama-sdpa").build().to(torch.bfloat16)
    prog = rw.capture(model, (zoo._ids(2, 7),), {"use_cache": False})
    rwonnx.export_onnx(prog, tmp_path / "m.onnx", "ort")
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    with pytest.raises(rw.RewriterError, match="no bfloat16 kernel .* float16 or float32"):
        rwonnx.session(tmp_path / "m.onnx")
