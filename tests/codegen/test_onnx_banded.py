"""Banded ONNX export of causal sink + window masks (codegen/onnx/banded.py): ONNX Runtime
(CPU) equals the torch program (fp32, relative 1e-5) for both targets, over lengths that are
not a multiple of the query block, shorter than one block, and longer than the window; sink 0
and > 0, GQA; and no attention tensor is S x S (the old path's keep-mask and scores are)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from attn_testlib import onnx_equals_program, output_tensors

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx import banded, translate
from rewriter.ir.masks import MaskSpec

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-5
TARGETS = ["onnx", "ort"]
SMALL_BLOCK = 8  # query rows per block in most tests: several blocks at zoo lengths
# (batch, seq) with 8-row blocks: not a multiple, under one block, a multiple, several blocks
SHAPES = [(2, 13), (1, 5), (2, 16), (1, 37)]


@pytest.fixture(scope="module")
def llama():
    return rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 9),), {"use_cache": False})


@pytest.fixture
def small_block(monkeypatch):
    monkeypatch.setattr(banded, "BLOCK", SMALL_BLOCK)


def lm_inputs(batch: int, seq: int):
    return (zoo._ids(batch, seq, seed=seq),), {"use_cache": False}


def export_and_compare(prog: rw.Program, path, target: str, make_inputs=lm_inputs,
                       shapes=SHAPES) -> list[dict]:
    return onnx_equals_program(prog, path, target, make_inputs, shapes, TOL)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", ["window=4,sink=2", "window=3,sink=1,dilation=2",
                                  "window=20,sink=3", "window=4"])
def test_llama_equals_program(llama, small_block, tmp_path, spec, target):
    """GQA 4/2 with the model's own [B, 1, S, S] mask gathered onto the band; windows shorter
    and longer than the block, sink 0 and > 0, dilation."""
    prog = rw.rewrite(llama, f"sparse:{spec}")
    rows = export_and_compare(prog, tmp_path / "m.onnx", target)
    assert {r["op"] for r in rows} == {"banded"}
    nk = banded.keys_read(MaskSpec.parse(spec), 4)
    assert all(f"{nk} keys" in r["reason"] for r in rows)


@pytest.mark.parametrize("target", TARGETS)
def test_default_block(llama, tmp_path, target):
    """The default 64-row block: under one block, one block and a bit, several blocks."""
    prog = rw.rewrite(llama, "sparse:window=8,sink=4")
    export_and_compare(prog, tmp_path / "m.onnx", target, shapes=[(2, 9), (1, 70), (1, 150)])


def test_mask_matters(llama, small_block, tmp_path):
    """The comparison is not vacuous: the sparse program differs from the dense one."""
    args, kwargs = lm_inputs(1, 37)
    with torch.no_grad():
        dense = output_tensors(llama.module(*args, **kwargs))[0]
        windowed = rw.rewrite(llama, "sparse:window=4,sink=2")
        sparse = output_tensors(windowed.module(*args, **kwargs))[0]
    assert (dense - sparse).abs().max() > 1e-3 * dense.abs().max()


@pytest.mark.parametrize("target", TARGETS)
def test_softcap_and_model_window(small_block, tmp_path, target):
    """gemma2: softcap, and a sliding-window layer whose own window (4, found at capture) is
    narrower than the variant's: the two combine into the model's window=4."""
    entry = zoo.get("gemma2-eager")
    prog = rw.capture(entry.build(), (zoo._ids(2, 9),), {"use_cache": False})
    rows = export_and_compare(rw.rewrite(prog, "sparse:window=6,sink=1"), tmp_path / "m.onnx",
                              target)
    assert {r["op"] for r in rows} == {"banded"}


def _causal_program():
    entry = zoo.get("sdpa-causal")  # F.sdpa(is_causal=True): no mask tensor at all, MHA
    args, kwargs = entry.inputs(2, 9)
    return rw.rewrite(rw.capture(entry.build(), args, kwargs), "sparse:window=5,sink=2"), \
        entry.inputs


def _wide_values(path, feed: dict, seq: int) -> list[str]:
    """Names of the values (every node output) with two or more axes of at least ``seq``,
    after running ``path`` on ``feed``."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {v.name: v for v in model.graph.value_info if v.type.tensor_type.elem_type}
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(v for name, v in typed.items() if name not in known)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, feed)
    return [n for n, o in zip(names, outs, strict=True)
            if sum(d >= seq for d in np.shape(o)) >= 2]


@pytest.mark.parametrize("target", TARGETS)
def test_no_square_tensor(tmp_path, monkeypatch, target):
    """is_causal attention with no model mask: the banded graph holds no [.., S, .., S] value
    (the old dense-mask path does); every other value is O(S * Nk)."""
    prog, make_inputs = _causal_program()
    seq = 150  # 3 blocks of 64, Nk = 2 + 4 + 64 = 70 < S
    args, _ = make_inputs(1, seq)
    rows = rwonnx.export_onnx(prog, tmp_path / "b.onnx", target)
    assert {r["op"] for r in rows} == {"banded"}
    feed = {onnx.load(str(tmp_path / "b.onnx")).graph.input[0].name: args[0].numpy()}
    assert _wide_values(tmp_path / "b.onnx", feed, seq) == []
    if target == "onnx":  # the old path: a dense keep-mask per site
        monkeypatch.setattr(translate, "_banded_choice", lambda *a: None)
        rwonnx.export_onnx(prog, tmp_path / "d.onnx", target)
        assert _wide_values(tmp_path / "d.onnx", feed, seq)
    export_and_compare(prog, tmp_path / "c.onnx", target, make_inputs,
                       shapes=[(2, 9), (1, seq), (2, 5)])


def test_model_mask_only_square(llama, tmp_path):
    """With the model's own causal mask, the banded graph's S x S values are the model's mask
    alone: as many as in the dense model's export (the old path adds its keep-masks)."""
    seq = 150
    rwonnx.export_onnx(llama, tmp_path / "dense.onnx", "onnx")
    rows = rwonnx.export_onnx(rw.rewrite(llama, "sparse:window=8,sink=4"), tmp_path / "b.onnx",
                              "onnx")
    assert {r["op"] for r in rows} == {"banded"}
    feed = {onnx.load(str(tmp_path / "b.onnx")).graph.input[0].name:
            lm_inputs(1, seq)[0][0].numpy()}
    assert len(_wide_values(tmp_path / "b.onnx", feed, seq)) == \
        len(_wide_values(tmp_path / "dense.onnx", feed, seq))


def test_decompose_keeps_decomposed(llama, tmp_path):
    """decompose=True asks for the plain MatMul/Softmax decomposition: it is kept."""
    rows = rwonnx.export_onnx(rw.rewrite(llama, "sparse:window=4,sink=2"), tmp_path / "m.onnx",
                              "onnx", decompose=True)
    assert {r["op"] for r in rows} == {"decomposed"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name, spec, parts", [
    ("llama-sdpa", "window=3,sink=1,heads=s/s/f/f", 2),  # KV head 0 windowed, KV head 1 full
    ("gpt2-eager", "window=4,sink=1,heads=s/f/s/f", 2),  # MHA: heads 0, 2 | 1, 3, put back
    ("gpt2-eager", "window=4,sink=1,heads=2/f/6/f", 2),  # windowed part with its own table
])
def test_per_kv_head_table_is_split(small_block, tmp_path, name, spec, parts, target):
    """A per-KV-head table (sparse:heads=auto's output) runs one op per part: full KV heads on
    the target's causal op, windowed ones banded; equal to the program."""
    prog = with_sparsity(rw.capture(zoo.get(name).build(), (zoo._ids(2, 9),),
                                    {"use_cache": False}), spec)
    rows = export_and_compare(prog, tmp_path / "m.onnx", target)
    assert {r["op"] for r in rows} == {translate.SPLIT_GQA if target == "ort"
                                       else translate.SPLIT_STANDARD}
    assert all(f"{parts} parts" in r["reason"] for r in rows)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", [
    "window=3,sink=1,heads=s/s/s/s",  # a table with one entry: the plain band
    "window=4,sink=1,heads=2/2/5/5",  # one window per KV head: keep [Hkv, 1, ...]
    "window=4,sink=2,heads=2/3/s/6",  # windows differ inside a KV group: keep [Hkv, G, ...]
])
def test_per_head_windows_share_one_band(llama, small_block, tmp_path, spec, target):
    """A per-head table without full heads is one banded op reading the widest window's
    keys, each head keeping its own window; equal to the program."""
    prog = with_sparsity(llama, spec)
    rows = export_and_compare(prog, tmp_path / "m.onnx", target)
    assert {r["op"] for r in rows} == {"banded"}
    nk = banded.keys_read(MaskSpec.parse(spec), 4)
    assert nk == 1 + max(MaskSpec.parse(spec).window_list(4)) - 1 + SMALL_BLOCK + (
        MaskSpec.parse(spec).sink - 1)
    assert all(f"{nk} keys" in r["reason"] for r in rows)


def with_sparsity(prog: rw.Program, spec: str) -> rw.Program:
    """``prog`` windowed, then every site's mask set to ``spec`` (per-head tables are what
    sparse:heads=auto writes; the pass grammar takes no table by hand)."""
    out = rw.rewrite(prog, "sparse:window=2")
    for node in out.module.graph.nodes:
        if node.op == "call_function" and "sparsity" in node.kwargs:
            node.kwargs = {**node.kwargs, "sparsity": spec}
    out.module.recompile()
    return out
