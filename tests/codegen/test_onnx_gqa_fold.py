"""Folds into GroupQueryAttention (rewriter.codegen.onnx.gqa_fold, issue #18, target "ort"): a
Llama with 16-wide heads exports with the rotary inside GroupQueryAttention (do_rotary, cos/sin
caches) and q/k/v as one packed projection, and the step equals the PyTorch decoder (prefill,
a chunk over a past, greedy tokens); what the kernel cannot take keeps the RotaryEmbedding op:
8-wide heads, per-row positions (padded decoders), partial rotary."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

import rewriter as rw
from rewriter import onnx as rwonnx

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
LAYERS = 2


def llama(head_dim: int = 16, partial: float | None = None):
    """A causal LM with ``head_dim``-wide heads (the zoo's are 8 wide); ``partial``: a
    partial-rotary model of the same size (Phi3's partial_rotary_factor)."""
    torch.manual_seed(0)
    common = dict(vocab_size=zoo.VOCAB, hidden_size=4 * head_dim, intermediate_size=96,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, attn_implementation="sdpa")
    if partial:
        config = transformers.Phi3Config(**common, partial_rotary_factor=partial,
                                         pad_token_id=0)
        model = transformers.Phi3ForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common,
                                                                       head_dim=head_dim))
    return rw.capture(model.eval(), (zoo._ids(2, 9),), {"use_cache": False})


@pytest.fixture(scope="module")
def wide():
    return llama()


def attention_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]


def attr(node: onnx.NodeProto, name: str, default=0):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def step_equals(sess, dec, ids: torch.Tensor, split: int) -> None:
    """Prefill ids[:, :split], then the rest as one chunk over that past: both outputs equal
    the PyTorch decoder's."""
    names = dec.input_names[1:]
    past = dec.empty_cache(ids.shape[0])
    feed = {"input_ids": ids[:, :split].numpy(), **{n: t.numpy() for n, t in
                                                    zip(names, past, strict=True)}}
    got, *present = sess.run(None, feed)
    want, cache = dec.step(ids[:, :split], past)
    assert np.abs(got - want.numpy()).max() <= TOL * np.abs(want.numpy()).max()
    feed = {"input_ids": ids[:, split:].numpy(), **dict(zip(names, present, strict=True))}
    got, *_ = sess.run(None, feed)
    want, _ = dec.step(ids[:, split:], cache)
    assert np.abs(got - want.numpy()).max() <= TOL * np.abs(want.numpy()).max()


def test_rotary_and_packed_qkv_folded(wide, tmp_path):
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(wide, path, "ort", kv_cache=True)
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert not {"RotaryEmbedding", "Neg", "Transpose"} & set(ops), ops
    producers = {o: n for n in graph.node for o in n.output}
    for node in attention_nodes(path):
        assert attr(node, "do_rotary") == 1 and attr(node, "rotary_interleaved") == 0
        assert node.input[7] and node.input[8]  # cos_cache, sin_cache
        assert producers[node.input[0]].op_type == "MatMul"  # q/k/v packed
        assert node.input[1] == node.input[2] == ""
    # the sites share their sizes (codegen/onnx/sizes.py): one cos/sin cache pair and one
    # seqlens_k for the model, not one per layer; gate/up stay apart (no Split)
    assert ops["Pad"] == 2 and "Split" not in ops, ops
    assert len({n.input[5] for n in attention_nodes(path)}) == 1
    sess = rwonnx.session(path)
    dec = wide.decoder()
    step_equals(sess, dec, zoo._ids(1, 7, seed=3), 4)  # batch 1: ORT takes S > 1 over a
    # past only there ("batch_size must be 1 when sequence_length > 1 and past context")
    step_equals(sess, dec, zoo._ids(3, 6, seed=4), 5)  # 3 rows: prefill 5, then one token
    ids = zoo._ids(3, 6, seed=5)
    assert torch.equal(rwonnx.generate(sess, ids, 8), dec.generate(ids, 8))


def test_prefill_graph_folds_too(wide, tmp_path):
    """The prefill-only graph's GroupQueryAttention (no past): positions 0..S-1."""
    from attn_testlib import onnx_equals_program

    onnx_equals_program(wide, tmp_path / "m.onnx", "ort",
                        lambda b, s: ((zoo._ids(b, s, seed=6),), {"use_cache": False}),
                        [(2, 8), (3, 13)], TOL)
    assert all(attr(n, "do_rotary") == 1 for n in attention_nodes(tmp_path / "m.onnx"))


@pytest.mark.parametrize("case", ["narrow-heads", "padded", "partial"])
def test_rotary_kept_where_the_kernel_cannot(wide, tmp_path, case):
    """8-wide heads (ORT wants multiples of 16), per-row positions of a padded decoder, and
    partial rotary keep the RotaryEmbedding op, and the export still equals the decoder."""
    prog = {"narrow-heads": lambda: llama(8), "padded": lambda: wide,
            "partial": lambda: llama(partial=0.5)}[case]()
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(prog, path, "ort", kv_cache=True, padded=case == "padded")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["RotaryEmbedding"] == 2 * LAYERS, ops
    assert not any(attr(n, "do_rotary") for n in attention_nodes(path))
    ids = zoo._ids(2, 5, seed=7)
    want = prog.decoder(padded=True).generate(ids, 6) if case == "padded" else \
        prog.decoder().generate(ids, 6)
    assert torch.equal(rwonnx.generate(rwonnx.session(path), ids, 6), want)
