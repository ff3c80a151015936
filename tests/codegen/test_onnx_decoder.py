"""ONNX decoders with past/present KV inputs and outputs: ONNX Runtime (CPU) equals the torch
decoder step by step (fp32, relative 1e-4) and greedy generation in ONNX Runtime equals
PyTorch token for token: on zoo decoders and variants, and on SmolLM2 (dense and GQA) for 32
tokens, up to a near-tie the measured fp32 noise cannot order (GreedyOracle)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from attn_testlib import ort_messages, quiet_session

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


def compare_steps(sess, dec, ids: torch.Tensor, cuts: list[int]) -> list[np.ndarray]:
    """Feed ``ids`` in chunks ending at ``cuts`` to ONNX Runtime and to the torch decoder,
    each with its own cache; logits and presents (and present_length, for a bounded decoder)
    agree at every step. Returns ONNX Runtime's last presents."""
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
            assert got.shape == tuple(ref.shape), f"present shape at tokens {start}:{end}"
            assert rel_err(got, ref) < TOL, f"present cache at tokens {start}:{end}"
        start = end
    return ort_past


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
                                  "prune-heads:heads=0.0;0.1;1.2;1.3", "drop-attn:layers=0",
                                  "sparse:topk=1,block=2,sink=1,local=2",
                                  "sparse:topk=2,block=3,local=1,estimate=channels:2"])
def test_variant_decoders(llama, tmp_path, spec, target):
    prog = rw.rewrite(llama[0], spec)
    dec = build_decoder(prog)
    rows = export_decoder(dec, tmp_path / "v.onnx", target)
    if target == "ort" and spec == "sparse:window=4":
        assert "local_window_size" in rows[0]["reason"]
    sess = rwonnx.session(tmp_path / "v.onnx", threads=1)
    compare_steps(sess, dec, zoo._ids(2, 12, seed=3), [6, 7, 8, 9, 10, 11])
    compare_steps(sess, dec, zoo._ids(1, 12, seed=4), [5, 9])


# --- bounded (sink + window) caches: past_length in, present_length out ----------------------

@pytest.mark.parametrize("target, decompose", MODES, ids=MODE_IDS)
def test_bounded_decoder_steps(llama, tmp_path, target, decompose):
    """window=3, sink=1: the cache keeps 3 positions; 20 tokens fed as a short prefill (below
    the bound), one-token steps, multi-token chunks past the bound, equal torch step by step."""
    dec = build_decoder(rw.rewrite(llama[0], "sparse:window=3,sink=1"))
    assert dec.bounded and {e.bound for e in dec.cache} == {3}
    path = tmp_path / "b.onnx"
    rows = export_decoder(dec, path, target, decompose=decompose)
    assert all(r["bound"] == 3 and r["op"] == ("decomposed" if decompose else "Attention")
               for r in rows)
    doc = json.loads(manifest_path(path).read_text())
    assert [c["bound"] for c in doc["cache"]] == [3] * len(dec.cache)
    sess = rwonnx.session(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == dec.input_names
    assert [o.name for o in sess.get_outputs()] == dec.output_names
    assert sess.get_inputs()[-1].shape == [] and sess.get_inputs()[-1].type == "tensor(int64)"
    past = compare_steps(sess, dec, zoo._ids(2, 20, seed=3),
                         [2, 3, 4, 8, 9, 10, 11, 12, 16, 17, 18, 19])
    assert [t.shape[2] for t in past[:-1]] == [3] * len(dec.cache) and int(past[-1]) == 20
    compare_steps(sess, dec, zoo._ids(1, 20, seed=4), [7, 8, 13])  # prefill past the bound


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_bounded_split_site(llama, tmp_path, target):
    """KV head 0's query heads (0, 1) windowed, KV head 1 full: each site is split into a
    bounded op and a plain cached op, each with its own cache entry."""
    prog = rw.rewrite(llama[0], "sparse:window=3,sink=1,heads=0;1")
    dec = build_decoder(prog)
    assert {e.bound for e in dec.cache} == {3, None}
    path = tmp_path / "s.onnx"
    rows = export_decoder(dec, path, target)
    assert {r.get("bound") for r in rows} == {3, None}
    sess = rwonnx.session(path, threads=1)
    # ("ort": the full heads' GroupQueryAttention takes multi-token chunks at batch 1 only)
    past = compare_steps(sess, dec, zoo._ids(2, 14, seed=3), [5, *range(6, 14)])
    assert [t.shape[2] for t in past[:-1]] == [14 if e.bound is None else 3 for e in dec.cache]
    compare_steps(sess, dec, zoo._ids(1, 16, seed=4), [2, 6, 7, 12])
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(rwonnx.generate(sess, prompt, 12), dec.generate(prompt, 12))


class BoundedOp(torch.nn.Module):
    def __init__(self, sparsity: str, bound: int):
        super().__init__()
        self.sparsity, self.bound = sparsity, bound

    def forward(self, q, k, v, past_key, past_value, past_length):
        return torch.ops.rewriter.bounded_cached_attention(
            q, k, v, past_key, past_value, past_length, scale=0.4, sparsity=self.sparsity,
            bound=self.bound, softcap=2.0)


@pytest.mark.parametrize("target, decompose", MODES[:2], ids=MODE_IDS[:2])  # ort: the same ops
@pytest.mark.parametrize("sparsity, bound", [("window=5,sink=2,heads=s/3/4/s", 6),
                                             ("window=4,sink=1,dilation=2", 5)])
def test_bounded_op_alone(tmp_path, target, decompose, sparsity, bound):
    """The op by itself (per-head windows, dilation, softcap): chunks of 1 to 5 tokens from an
    empty cache to well past the bound (L + S below the sink, at the bound, beyond it) give
    the eager op's output and evicted presents."""
    import onnx_ir as ir
    from torch.export import Dim

    from rewriter.codegen.onnx.export import _to_onnx
    from rewriter.codegen.onnx.translate import plan

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    module = BoundedOp(sparsity, bound)
    args = (rand(1, 4, 2, 8), rand(1, 2, 2, 8), rand(1, 2, 2, 8), rand(1, 2, 3, 8),
            rand(1, 2, 3, 8), torch.tensor(3))
    seq, past = Dim("sequence"), Dim("past_sequence")
    shapes = ({2: seq}, {2: seq}, {2: seq}, {2: past}, {2: past}, {})
    graph = torch.export.export(module, args, dynamic_shapes=shapes).graph_module
    plans = plan(graph, {}, target, decompose)
    assert [p.bound for p in plans] == [bound]
    path = tmp_path / "op.onnx"
    ir.save(_to_onnx(module, args, {}, shapes, plans), path)
    sess = rwonnx.session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    cache = [torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8)]
    length = 0
    for new in [1, 1, 3, 1, 2, 5, 1, 1, 4, 1]:
        step = (rand(1, 4, new, 8), rand(1, 2, new, 8), rand(1, 2, new, 8), *cache,
                torch.tensor(length))
        want = module(*step)
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, step, strict=True)})
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape) and rel_err(g, w) < TOL, f"at {length}+{new}"
        cache, length = list(want[1:]), length + new
    assert cache[0].shape[2] == bound


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
# Two fp32 code paths each round within the program's measured noise of the exact (float64)
# logits, so their greedy choices may differ only where the exact top two are within twice
# that of each other; 4x leaves room for a runtime rounding a little worse than torch.
NEAR_TIE = 4.0


class GreedyOracle:
    """Exact (float64) logits along a greedy sequence of ``program``, and the fp32 rounding
    noise on them (max |fp32 - float64|, in logits)."""

    def __init__(self, program, tokens: torch.Tensor):
        from rewriter.analysis.quality import logits_fn
        from rewriter.ir.precision import float64_module

        with torch.no_grad():
            self.exact = logits_fn(program, float64_module(program.module))(tokens)
            low = logits_fn(program)(tokens)
        self.noise = float((low.double() - self.exact).abs().max())
        self.tokens = tokens

    def assert_agrees(self, got: torch.Tensor, start: int, what: str) -> None:
        """``got`` equals the oracle's tokens from ``start`` on, up to the first near-tie (two
        candidates within NEAR_TIE x noise in exact logits): past it the sequences may part."""
        want = self.tokens
        assert got.shape[0] == want.shape[0] and torch.equal(got[:, :start], want[:, :start])
        for t in range(start, min(got.shape[1], want.shape[1])):
            for row in range(got.shape[0]):
                a, b = int(got[row, t]), int(want[row, t])
                if a == b:
                    continue
                gap = float(self.exact[row, t - 1, b] - self.exact[row, t - 1, a])
                assert abs(gap) <= NEAR_TIE * self.noise, (
                    f"{what}: token {t} is {a}, not {b}, where the exact logits differ by "
                    f"{gap:.3g} (fp32 noise {self.noise:.3g})")
                return  # a near-tie: beyond it the two sequences may differ


def smollm_generation(tmp_path, specs: list[str], capfd, ort_last_logits: bool = False) -> None:
    """``ort_last_logits``: the "ort" file keeps the last position's logits only."""
    from rewriter.models import load

    loaded = load("smollm2-135m")
    prog = loaded.capture(16)
    if specs:
        prog = rw.rewrite(prog, specs)
    prompt = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    start = prompt.shape[1]
    want = greedy_reference(prog, prompt, 32)  # the program, no cache, in PyTorch
    oracle = GreedyOracle(prog, want)
    if not specs:  # the dense program is the Hugging Face model: its generate() agrees
        with torch.no_grad():  # (up to where it stops at end-of-sequence)
            hf = loaded.model.generate(prompt, max_new_tokens=32, do_sample=False,
                                       attention_mask=torch.ones_like(prompt))
        assert hf.shape[1] > start + 8
        oracle.assert_agrees(hf, start, "transformers generate()")
    dec = build_decoder(prog)
    oracle.assert_agrees(dec.generate(prompt, 32), start, "torch decoder")
    for target in ("onnx", "ort"):
        path = tmp_path / f"{target}.onnx"
        last = ort_last_logits and target == "ort"
        export_decoder(dec.last_logits_only() if last else dec, path, target)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "CastLike"} & ops, target
        capfd.readouterr()
        sess = quiet_session(path, threads=1)  # the suite runs two workers on two cores
        assert (sess.get_outputs()[0].shape[1] == 1) == last
        out, err = capfd.readouterr()
        assert not ort_messages(out + err), (target, ort_messages(out + err))  # as test_onnx_lean
        oracle.assert_agrees(rwonnx.generate(sess, prompt, 32), start, target)


@pytest.mark.slow
def test_smollm2_dense_generation(tmp_path, capfd):
    smollm_generation(tmp_path, [], capfd)


@pytest.mark.slow
def test_smollm2_gqa_generation(tmp_path, capfd):
    smollm_generation(tmp_path, ["gqa:kv-heads=1"], capfd, ort_last_logits=True)


def numpy_feed_generate(sess, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with plain ``sess.run`` numpy feeds: the reference for the IO binding."""
    inputs, outputs = sess.get_inputs()[1:], [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((), np.int64) if i.name == "past_length" else
            np.zeros((prompt.shape[0], i.shape[1], 0, i.shape[3]), np.float32) for i in inputs}
    step, out = prompt.numpy(), [prompt.numpy()]
    for _ in range(new):
        results = dict(zip(outputs, sess.run(None, {"input_ids": step, **past}), strict=True))
        step = results["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(step)
        past = {n: results[n.replace("past_", "present_", 1)] for n in past}
    return torch.from_numpy(np.concatenate(out, axis=1))


@pytest.mark.parametrize("spec", [None, "sparse:window=3,sink=1"], ids=["full", "bounded"])
def test_io_binding_generation_equals_numpy_feeds(llama, tmp_path, spec):
    """generate binds each step's presents as the next step's pasts (no copy); the tokens
    equal a numpy-feed loop, also for a bounded cache whose presents keep one shape."""
    dec = llama[1] if spec is None else build_decoder(rw.rewrite(llama[0], spec))
    export_decoder(dec, tmp_path / "d.onnx", "onnx")
    sess = rwonnx.session(tmp_path / "d.onnx", threads=1)
    prompt = zoo._ids(2, 4, seed=6)
    want = numpy_feed_generate(sess, prompt, 12)
    assert want.shape == (2, 16)
    assert torch.equal(rwonnx.generate(sess, prompt, 12), want)


def test_kv_cache_auto_resolves_by_model():
    """export_onnx(kv_cache="auto"), the CLI's default: the decoder step for causal LMs, the
    prefill graph for encoders and encoder-decoders; other values are a one-line error."""
    from rewriter.errors import RewriterError
    from rewriter.onnx import resolve_kv_cache

    lm = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 9),), {"use_cache": False})
    args, kwargs = zoo.get("bert-sdpa").inputs(2, 8)
    encoder = rw.capture(zoo.get("bert-sdpa").build(), args, kwargs)
    assert resolve_kv_cache(lm, "auto") and not resolve_kv_cache(encoder, "auto")
    assert resolve_kv_cache(encoder, False) is False and resolve_kv_cache(lm, True) is True
    with pytest.raises(RewriterError, match="True, False or 'auto'"):
        resolve_kv_cache(lm, "yes")


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_last_position_logits(llama, tmp_path, target, padded):
    """logits="last": the file's logits are [B, 1, V], equal to the full decoder's last row at
    prefill and at each step, with the same presents; generate gives the same tokens; the
    manifest says which logits the file has."""
    prog, dec = llama
    path = tmp_path / "last.onnx"
    prog.export_onnx(path, target, kv_cache=True, logits="last", padded=padded)
    assert json.loads(manifest_path(path).read_text())["logits"] == "last"
    sess = rwonnx.session(path, threads=1)
    assert sess.get_outputs()[0].shape[1:] == [1, zoo.VOCAB]
    ids = zoo._ids(2, 9, seed=3)
    names = [i.name for i in sess.get_inputs()][1:]
    past, torch_past, start = [t.numpy() for t in dec.empty_cache(2)], dec.empty_cache(2), 0
    for end in (6, 7, 8, 9):  # prefill, then single tokens (ORT GQA: batch 2)
        feed = {"input_ids": ids[:, start:end].numpy(), **dict(zip(names, past, strict=False))}
        if padded:
            feed["attention_mask"] = np.ones((2, end), dtype=np.int64)
        logits, *past = sess.run(None, feed)
        want, torch_past = dec.step(ids[:, start:end], torch_past)
        assert logits.shape == (2, 1, zoo.VOCAB)
        assert rel_err(logits, want[:, -1:]) < TOL
        assert all(rel_err(a, b) < TOL for a, b in zip(past, torch_past, strict=True))
        start = end
    prompt = zoo._ids(2, 4, seed=5)
    assert torch.equal(rwonnx.generate(sess, prompt, 8), greedy_reference(prog, prompt, 8))


@pytest.mark.parametrize("options, message", [
    ({"logits": "first"}, "logits='first': give one of all, last"),
    ({"logits": "last", "kv_cache": False}, "logits='last' is for decoders"),
])
def test_last_position_logits_errors(llama, tmp_path, options, message):
    from rewriter.errors import RewriterError

    with pytest.raises(RewriterError, match=message):
        rwonnx.export_onnx(llama[0], tmp_path / "d.onnx", "onnx",
                           **{"kv_cache": True, **options})
    assert list(tmp_path.iterdir()) == []
