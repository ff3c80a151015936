"""ALiBi through variants, decoders and backends: the ``alibi`` slopes of the canonical op follow
their query heads (prune-heads drops the pruned heads' slopes, gqa keeps one per query head),
decoders attend over the cache with them, and backends either serve them or say why not.

References are the original models with the variant's effect written into their own weights
(a pruned head's o_proj columns zeroed; K/V projections mean-pooled per group), so the model
computes its own ALiBi bias: a wrong slope on any head shows up in the outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import rewriter as rw
from rewriter.decoder import build_decoder, greedy_reference

zoo = pytest.importorskip("zoo")

TOL = 1e-5
H, D = zoo.H, zoo.D
BLOOM_SLOPES = [0.25, 0.0625, 0.015625, 0.00390625]  # BLOOM's for 4 heads: 2^(-2 (h + 1))
ALIBI_LMS = ["bloom-eager", "mpt-eager", "falcon-alibi-eager"]


def capture_lm(name: str, seq: int = 9) -> tuple[torch.nn.Module, rw.Program]:
    model = zoo.get(name).build()
    return model, rw.capture(model, (zoo._ids(2, seq),), {"use_cache": False})


def logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        out = module(ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bloom_sites_carry_slopes(zoo_captured):
    prog = zoo_captured("bloom-eager").prog
    for site in prog.sites:
        assert site.alibi == tuple(BLOOM_SLOPES) and site.positional == "alibi"
        assert site.to_dict()["alibi"] == tuple(BLOOM_SLOPES)
    assert rw.AttentionSite.from_dict(prog.sites[0].to_dict(full=True)).alibi == \
        tuple(BLOOM_SLOPES)


def test_mpt_slopes(zoo_captured):
    # MPT: 1 / 2^(8 (h + 1) / H) over arange(1 - L, 1): the same slopes for 4 heads
    for site in zoo_captured("mpt-eager").prog.sites:
        assert site.alibi == pytest.approx(BLOOM_SLOPES)


@pytest.mark.parametrize("name", ALIBI_LMS)
def test_left_padding_is_exact(name):
    """Positions from the mask's cumsum (BLOOM, Falcon) are kv_idx minus the row's padding on
    the keys the mask keeps: a per-row constant, so ``slope * kv_idx`` is the same attention.
    Captured on a left-padded example too (the proof reads the mask as all-ones)."""
    entry = zoo.get(name)
    model = entry.build()
    args, kwargs = entry.inputs(2, 7)
    padded = torch.ones_like(kwargs["attention_mask"])
    padded[0, :2] = 0
    prog = rw.capture(model, args, {**kwargs, "attention_mask": padded})
    assert all(s.alibi and s.positional == "alibi" for s in prog.sites)
    for batch, seq, pad in ((2, 9, 3), (3, 13, 5)):
        args, kwargs = entry.inputs(batch, seq)
        mask = torch.ones_like(kwargs["attention_mask"])
        mask[0, :pad] = 0
        report = prog.verify(model, args, {**kwargs, "attention_mask": mask})
        assert report.max_rel <= TOL, str(report)


def test_save_load_keeps_slopes(tmp_path):
    entry = zoo.get("bloom-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    new = rw.rewrite(prog, "prune-heads:heads=0.1,compensate=none")
    new.save(tmp_path / "out")
    again = rw.load(tmp_path / "out")
    assert [s.alibi for s in again.sites] == [s.alibi for s in new.sites]
    assert again.verify(new, *entry.inputs(3, 9)).max_rel <= TOL


# --- prune-heads ---------------------------------------------------------------------------------

def _bloom_dense(model, layer):
    return model.transformer.h[layer].self_attention.dense


def test_prune_heads_drops_their_slopes():
    model, prog = capture_lm("bloom-eager")
    pruned = rw.rewrite(prog, "prune-heads:heads=0.1;1.0;1.2,compensate=none")
    assert [s.alibi for s in pruned.sites] == [
        (BLOOM_SLOPES[0], BLOOM_SLOPES[2], BLOOM_SLOPES[3]),
        (BLOOM_SLOPES[1], BLOOM_SLOPES[3])]
    assert [s.num_heads for s in pruned.sites] == [3, 2]
    # reference: the original BLOOM with the pruned heads' output columns zeroed
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in ((0, [1]), (1, [0, 2])):
            for h in heads:
                _bloom_dense(ref, layer).weight[:, h * D:(h + 1) * D] = 0
    for batch, seq in ((2, 7), (3, 11)):
        ids = zoo._ids(batch, seq, seed=5)
        assert rel_err(logits(pruned.module, ids), logits(ref, ids)) < TOL


def test_prune_heads_wrong_slopes_would_show():
    """Control for the reference above: the same pruned program with the slopes left in
    head order of the unpruned model is measurably different."""
    _, prog = capture_lm("bloom-eager")
    pruned = rw.rewrite(prog, "prune-heads:heads=0.1;1.0;1.2,compensate=none")
    broken = pruned.clone()
    for node in broken.module.graph.nodes:
        if node.kwargs.get("alibi"):
            n = len(node.kwargs["alibi"])
            node.kwargs = {**node.kwargs, "alibi": BLOOM_SLOPES[:n]}
    broken.module.recompile()
    ids = zoo._ids(2, 11, seed=5)
    assert rel_err(logits(broken.module, ids), logits(pruned.module, ids)) > 10 * TOL


# --- gqa ---------------------------------------------------------------------------------------

def test_gqa_keeps_per_query_head_slopes():
    model, prog = capture_lm("bloom-eager")
    merged = rw.rewrite(prog, "gqa:kv-heads=2,merge=mean")
    assert all(s.alibi == tuple(BLOOM_SLOPES) and s.num_kv_heads == 2 for s in merged.sites)
    # reference: BLOOM with each group's K and V rows of the fused QKV mean-pooled
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for block in ref.transformer.h:
            qkv = block.self_attention.query_key_value
            w = qkv.weight.view(H, 3, D, -1)
            b = qkv.bias.view(H, 3, D)
            for grp in (slice(0, 2), slice(2, 4)):
                for part in (1, 2):  # k, v
                    w[grp, part] = w[grp, part].mean(0, keepdim=True)
                    b[grp, part] = b[grp, part].mean(0, keepdim=True)
    for batch, seq in ((2, 7), (1, 12)):
        ids = zoo._ids(batch, seq, seed=6)
        assert rel_err(logits(merged.module, ids), logits(ref, ids)) < TOL


# --- decoders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALIBI_LMS)
def test_alibi_decoder_reproduces_program(name):
    """Prefill + chunks + one-token steps == one forward (the cache needs no ALiBi offset:
    cache entry j is position j), and greedy tokens past the prompt match no-cache greedy."""
    _, prog = capture_lm(name)
    dec = build_decoder(prog)
    assert dec.verify_error is not None and dec.verify_error < 1e-8
    ids = zoo._ids(2, 12, seed=3)
    past, out, start = dec.empty_cache(2), [], 0
    for end in (6, 9, 10, 11, 12):
        step, past = dec.step(ids[:, start:end], past)
        out.append(step)
        start = end
    with torch.no_grad():
        assert rel_err(torch.cat(out, 1), prog.module(ids, use_cache=False).logits) < TOL
    prompt = zoo._ids(2, 5, seed=4)
    assert torch.equal(dec.generate(prompt, 10), greedy_reference(prog, prompt, 10))


@pytest.mark.parametrize("spec", ["prune-heads:heads=0.1;1.0,compensate=none",
                                  "gqa:kv-heads=1,merge=mean", "sparse:window=4"])
def test_alibi_variant_decoders(spec):
    _, prog = capture_lm("bloom-eager")
    new = rw.rewrite(prog, spec)
    dec = build_decoder(new)
    ids = zoo._ids(2, 12, seed=3)
    past, out, start = dec.empty_cache(2), [], 0
    for end in (6, 10, 11, 12):
        step, past = dec.step(ids[:, start:end], past)
        out.append(step)
        start = end
    with torch.no_grad():
        assert rel_err(torch.cat(out, 1), new.module(ids, use_cache=False).logits) < TOL
    if spec.startswith("sparse"):  # ALiBi needs positions: no evicting (bounded) cache
        assert all(e.bound is None for e in dec.cache)


# --- ONNX --------------------------------------------------------------------------------------

ONNX_MODES = [("onnx", False), ("onnx", True), ("ort", False)]
ONNX_IDS = ["onnx", "onnx-decomposed", "ort"]


@pytest.mark.parametrize("target, decompose", ONNX_MODES, ids=ONNX_IDS)
@pytest.mark.parametrize("name", ["bloom-eager", "mpt-eager", "baddbmm-alibi"])
def test_onnx_alibi_equals_program(tmp_path, name, target, decompose):
    """ONNX Runtime equals the program (relative 1e-4, fp32) at two shapes; the bias is built
    in-graph from the slopes (the manifest says so)."""
    pytest.importorskip("onnxruntime")
    from attn_testlib import onnx_equals_program

    entry = zoo.get(name)
    prog = rw.capture(entry.build(), *entry.inputs(2, 8))
    if name == "bloom-eager":  # a variant's slopes, not only the model's
        prog = rw.rewrite(prog, "prune-heads:heads=0.1;1.0,compensate=none")
    rows = onnx_equals_program(prog, tmp_path / "m.onnx", target, entry.inputs,
                               [(2, 8), (3, 13)], 1e-4, decompose=decompose)
    assert all("ALiBi" in r["reason"] for r in rows)
    assert {r["op"] for r in rows} == {"decomposed" if decompose else "Attention"}


@pytest.mark.parametrize("target, decompose", ONNX_MODES, ids=ONNX_IDS)
def test_onnx_alibi_decoder(tmp_path, target, decompose):
    """An ALiBi decoder in ONNX Runtime: step by step equal to the torch decoder, and greedy
    generation token for token equal to no-cache greedy decoding."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from rewriter import onnx as rwonnx
    from rewriter.codegen.onnx.export import export_decoder

    _, prog = capture_lm("bloom-eager")
    dec = build_decoder(prog)
    path = tmp_path / "d.onnx"
    rows = export_decoder(dec, path, target, decompose=decompose)
    assert all(r["kv_cache"] and "ALiBi" in r["reason"] for r in rows)
    sess = rwonnx.session(path, threads=1)
    names = dec.input_names[1:]
    ids = zoo._ids(2, 11, seed=3)
    ort_past = [t.numpy() for t in dec.empty_cache(2)]
    torch_past = dec.empty_cache(2)
    start = 0
    for end in (6, 8, 9, 10, 11):
        chunk = ids[:, start:end]
        got, *ort_past = sess.run(None, {"input_ids": chunk.numpy(),
                                         **dict(zip(names, ort_past, strict=True))})
        want, torch_past = dec.step(chunk, torch_past)
        assert float(np.abs(got - want.numpy()).max() / want.abs().max()) < 1e-4
        start = end
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(rwonnx.generate(sess, prompt, 8), greedy_reference(prog, prompt, 8))
