"""Packed projections (rewriter.codegen.onnx.packing, issue #18): MatMuls reading the same
activation with constant weights become one MatMul on the concatenated weight and a Split.

Positive: same-input MatMuls pack (hand-built, plain and transposed weights); a
cross-attention's k/v (T5) pack across layers; the choice an export makes (lean.PACKING): only
the q/k/v of one GroupQueryAttention, in q, k, v order. Negative: MatMuls on different inputs, a
MatMul whose second operand is an activation, a lone MatMul stay; an export packs nothing that a
Split would cut apart again (the zoo Llama). Numeric: ONNX Runtime equals the unpacked graph
(hand-built, T5) and the program (zoo, relative 1e-5)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from attn_testlib import onnx_equals_program
from onnx import TensorProto, helper

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.gqa_fold import group_query_qkv
from rewriter.codegen.onnx.packing import pack_projections

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-5


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_exports_pack_only_what_attention_takes_packed(tmp_path, target):
    """The zoo Llama: its 8-wide heads keep the RotaryEmbedding op between q/k and the
    attention, so no projection feeds an op that takes it packed, and none is packed (no Split
    on either target); the export still equals the program. (16-wide heads, whose q/k/v pack
    into GroupQueryAttention: test_onnx_gqa_fold.py.)"""
    entry = zoo.get("llama-sdpa")
    args, kwargs = entry.inputs(2, 8)
    prog = rw.capture(entry.build(), args, kwargs)
    path = tmp_path / "m.onnx"
    onnx_equals_program(prog, path, target, entry.inputs, [(2, 8), (3, 13)], TOL)
    ops = op_counts(path)
    # per layer: q, k, v, o, gate, up, down; then the LM head
    assert ops["MatMul"] == 7 * zoo.LAYERS + 1 and ops["Split"] == 0


def test_cross_attention_kv_packs(tmp_path):
    """T5, packed on request (pack_projections with no choice, not what an export does):
    every decoder layer's cross-attention k/v read the encoder output, so all of them pack
    into one MatMul, and ONNX Runtime computes what the unpacked export did."""
    entry = zoo.get("t5-sdpa")
    args, kwargs = entry.inputs(2, 8)
    prog = rw.capture(entry.build(), args, kwargs)
    path = tmp_path / "m.onnx"
    prog.export_onnx(path, target="onnx")
    model = onnx.load(str(path))
    packed, groups = _packed(model)
    shapes = {i.name: list(i.dims) for i in packed.graph.initializer}
    widths = collections.Counter(shapes[n.input[1]][1] for n in packed.graph.node
                                 if n.name.startswith("packed_matmul"))
    inner = zoo.H * zoo.D
    # self-attention q/k/v (3 x inner) in both stacks; the cross k/v of all decoder layers
    assert widths == {3 * inner: 2 * zoo.LAYERS, 2 * zoo.LAYERS * inner: 1}
    assert groups == sum(widths.values())
    onnx.save(packed, str(tmp_path / "packed.onnx"))
    got, want = (rwonnx.run(rwonnx.session(p), *args, **kwargs)
                 for p in (tmp_path / "packed.onnx", path))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


# --- hand-built graphs -------------------------------------------------------------------

def _model(nodes, inputs, outputs, weights):
    inits = [helper.make_tensor(name, TensorProto.FLOAT, w.shape, w.flatten().tolist())
             for name, w in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _packed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    m = ir.serde.deserialize_model(model)
    groups = pack_projections(m)
    return ir.serde.serialize_model(m), groups


def _weights(*shapes, seed=0):
    g = np.random.default_rng(seed)
    return {f"w{i}": g.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


def test_same_input_matmuls_pack_and_compute_the_same():
    w = _weights((8, 4), (8, 2), (8, 6))
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    model = _model(nodes, [("x", [2, 3, 8])], ["y0", "y1", "y2"], w)
    packed, groups = _packed(model)
    assert groups == 1
    ops = collections.Counter(n.op_type for n in packed.graph.node)
    assert ops == {"MatMul": 1, "Split": 1}
    assert {i.name for i in packed.graph.initializer} >= {"packed_weight_0"}
    assert not {"w0", "w1", "w2"} & {i.name for i in packed.graph.initializer}
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    for got, want in zip(_run(packed, feed), _run(model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_transposed_weights_pack():
    """Real models export ``MatMul(x, Transpose(W))`` with W [N, K] (weight-sized transposes
    are left for ONNX Runtime to fold): those pack, the transposes and the Ws go."""
    w = _weights((4, 8), (2, 8), (6, 8))
    nodes = [n for i in range(3) for n in (
        helper.make_node("Transpose", [f"w{i}"], [f"t{i}"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", f"t{i}"], [f"y{i}"]))]
    model = _model(nodes, [("x", [2, 3, 8])], ["y0", "y1", "y2"], w)
    packed, groups = _packed(model)
    assert groups == 1
    assert collections.Counter(n.op_type for n in packed.graph.node) == {"MatMul": 1, "Split": 1}
    assert [i.name for i in packed.graph.initializer if i.name.startswith("w")] == []
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    for got, want in zip(_run(packed, feed), _run(model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_other_matmuls_stay():
    """Different inputs, an activation as the second operand, a lone MatMul: nothing packs."""
    w = _weights((8, 4), (8, 4))
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y0"]),
             helper.make_node("MatMul", ["z", "w1"], ["y1"]),   # another input
             helper.make_node("MatMul", ["x", "u"], ["y2"]),    # an activation weight
             helper.make_node("Transpose", ["v"], ["vt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "vt"], ["y3"])]   # transposed, not a constant
    model = _model(nodes, [("x", [2, 8]), ("z", [2, 8]), ("u", [8, 4]), ("v", [4, 8])],
                   ["y0", "y1", "y2", "y3"], w)
    packed, groups = _packed(model)
    assert groups == 0
    assert collections.Counter(n.op_type for n in packed.graph.node) == {"MatMul": 4,
                                                                        "Transpose": 1}


def _group_query_graph(order: list[str]) -> tuple[ir.Graph, dict[str, ir.Node]]:
    """MatMuls q, k, v (in ``order``) feeding one GroupQueryAttention, and gate/up feeding a
    Mul, all on one input x [1, 2, 8] (never run: the choice only reads the graph)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 8]))
    weights = {n: ir.Value(name=f"w_{n}", type=ir.TensorType(ir.DataType.FLOAT),
                           shape=ir.Shape([8, 4]),
                           const_value=ir.tensor(np.zeros((8, 4), np.float32)))
               for n in ("q", "k", "v", "gate", "up")}
    nodes = {n: ir.Node("", "MatMul", [x, weights[n]], name=n) for n in [*order, "gate", "up"]}
    attn = ir.Node("com.microsoft", "GroupQueryAttention",
                   [nodes[n].outputs[0] for n in ("q", "k", "v")], num_outputs=3)
    mul = ir.Node("", "Mul", [nodes["gate"].outputs[0], nodes["up"].outputs[0]])
    graph = ir.Graph([x], [*attn.outputs, *mul.outputs], nodes=[*nodes.values(), attn, mul],
                     initializers=list(weights.values()), opset_imports={"": 23})
    return graph, nodes


@pytest.mark.parametrize("order", [["q", "k", "v"], ["v", "q", "k"]])
def test_export_choice_is_the_group_query_qkv_in_order(order):
    graph, nodes = _group_query_graph(order)
    members = [n for n in graph if n.op_type == "MatMul"]
    assert group_query_qkv(members) == [nodes["q"], nodes["k"], nodes["v"]]
    model = ir.Model(graph, ir_version=10)
    assert pack_projections(model, group_query_qkv) == 1
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == {"MatMul": 3, "Split": 1, "GroupQueryAttention": 1, "Mul": 1}  # gate/up stay
    split = next(n for n in model.graph if n.op_type == "Split")
    attn = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert list(attn.inputs) == list(split.outputs)  # q, k, v in the op's order


def test_export_choice_refuses_projections_read_elsewhere():
    """A q also read by something else, or only two of the three: no group."""
    graph, nodes = _group_query_graph(["q", "k", "v"])
    ir.Node("", "Relu", [nodes["q"].outputs[0]], graph=graph)
    assert group_query_qkv([nodes[n] for n in ("q", "k", "v")]) is None
    graph, nodes = _group_query_graph(["q", "k", "v"])
    assert group_query_qkv([nodes["q"], nodes["k"]]) is None
    assert group_query_qkv([nodes["gate"], nodes["up"]]) is None
