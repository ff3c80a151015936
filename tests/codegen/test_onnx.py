"""ONNX export: onnx.checker passes and ONNX Runtime (CPU) equals program.module (fp32,
relative 1e-4) at the export shape and at another batch and length, for both targets."""

from __future__ import annotations

import json

import onnx
import pytest
from attn_testlib import onnx_equals_program

import rewriter as rw
from rewriter import onnx as rwonnx

pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-4
SHAPES = [(2, 8), (3, 13)]  # (batch, seq): the export shape, then another batch and length
TARGETS = ["onnx", "ort"]
MODELS = ["llama-eager", "llama-sdpa", "gemma2-eager", "gpt2-sdpa", "bert-sdpa", "t5-sdpa",
          "whisper-sdpa", "mha", "bmm", "sdpa-causal", "masked-fill", "repeat-kv"]
VARIANTS = ["sparse:window=3,sink=1", "sparse:window=4,heads=0;2", "share-kv:group=2",
            "share-attn:group=2", "drop-attn:layers=1", "sparse:topk=1,block=2,sink=1,local=2",
            "sparse:topk=2,block=3,local=1,estimate=channels:2"]


def export_and_compare(prog: rw.Program, path, target: str, make_inputs, shapes=SHAPES,
                       noise_floor: bool = False, **options) -> list[dict]:
    return onnx_equals_program(prog, path, target, make_inputs, shapes, TOL, noise_floor,
                               **options)


@pytest.fixture(scope="module")
def captured():
    cache: dict[str, tuple[rw.Program, object]] = {}

    def get(name: str):
        if name not in cache:
            entry = zoo.get(name)
            args, kwargs = entry.inputs(*SHAPES[0])
            cache[name] = (rw.capture(entry.build(), args, kwargs), entry.inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_zoo(captured, tmp_path, name, target):
    prog, make_inputs = captured(name)
    rows = export_and_compare(prog, tmp_path / "m.onnx", target, make_inputs)
    assert len(rows) == len(prog.sites)
    assert "onnx" not in prog.manifest  # exporting does not change the program
    written = json.loads((tmp_path / "m.onnx.json").read_text())
    assert written["target"] == target and written["sites"] == rows
    if target == "onnx":
        assert {r["op"] for r in rows} == {"Attention"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", VARIANTS)
def test_variants(captured, tmp_path, spec, target):
    prog, make_inputs = captured("llama-sdpa")
    export_and_compare(rw.rewrite(prog, spec), tmp_path / "m.onnx", target, make_inputs)


@pytest.mark.parametrize("name", ["llama-sdpa", "gemma2-eager", "bert-sdpa"])
def test_decomposed(captured, tmp_path, name):
    """Standard ops only (MatMul/Softmax), GQA without repeating K/V; dilation on llama."""
    prog, make_inputs = captured(name)
    if name == "llama-sdpa":
        prog = rw.rewrite(prog, "sparse:window=5,sink=1,dilation=2")
    rows = export_and_compare(prog, tmp_path / "m.onnx", "onnx", make_inputs, decompose=True)
    assert {r["op"] for r in rows} == {"decomposed"}
    graph_ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Attention" not in graph_ops and "MatMul" in graph_ops


def test_ort_manifest(captured, tmp_path):
    """Causal self-attention becomes GroupQueryAttention (a sink + window mask: "banded"),
    the rest MultiHeadAttention or the standard op, each with a reason; written as JSON."""
    prog, _ = captured("whisper-sdpa")
    rows = rwonnx.export_onnx(prog, tmp_path / "w.onnx", "ort")
    assert {r["op"] for r in rows} == {"GroupQueryAttention", "MultiHeadAttention"}
    assert all(r["reason"] for r in rows)
    doc = json.loads((tmp_path / "w.onnx.json").read_text())
    assert doc["sites"] == rows and doc["target"] == "ort"
    prog, _ = captured("llama-sdpa")  # a causal window: banded (faster than local_window_size)
    rows = rwonnx.export_onnx(rw.rewrite(prog, "sparse:window=3"), tmp_path / "l.onnx", "ort")
    assert {r["op"] for r in rows} == {"banded"} and all("keys" in r["reason"] for r in rows)
    graph = onnx.load(str(tmp_path / "l.onnx")).graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    prog, _ = captured("repeat-kv")  # GQA without a causal mask: no contrib op fits
    rows = rwonnx.export_onnx(prog, tmp_path / "r.onnx", "ort")
    assert rows[0]["op"] == "Attention" and "causal-only" in rows[0]["reason"]


def test_dynamic_axes(captured, tmp_path):
    prog, _ = captured("llama-sdpa")
    prog.export_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert all(d.dim_param for d in dims[:2]), value  # batch and sequence are symbolic


def test_bad_target_leaves_no_file(captured, tmp_path):
    prog, _ = captured("mha")
    with pytest.raises(rw.RewriterError, match="unknown ONNX target"):
        prog.export_onnx(tmp_path / "m.onnx", target="tensorrt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", TARGETS)
def test_minilm(tmp_path, target):
    from rewriter.models import load

    loaded = load("minilm-l6")
    prog = loaded.capture(16)

    def make_inputs(batch, seq):
        return loaded.example_inputs(seq, batch)

    export_and_compare(prog, tmp_path / "m.onnx", target, make_inputs, shapes=[(2, 16), (1, 37)],
                       noise_floor=True)
