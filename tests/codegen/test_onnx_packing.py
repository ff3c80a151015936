"""Packed projections (rewriter.codegen.onnx.packing, issue #18): MatMuls reading the same
activation with constant weights become one MatMul on the concatenated weight and a Split.

Positive: q/k/v and gate/up of the zoo Llama pack on both targets (one MatMul per group, the
weight [E, (H + 2 Hkv) D]); a cross-attention's k/v (T5) pack. Negative: MatMuls on different
inputs, a MatMul whose second operand is an activation, a lone MatMul stay. Numeric: ONNX
Runtime equals the unpacked graph (hand-built) and the program (zoo, relative 1e-5)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attn_testlib import onnx_equals_program
from onnx import TensorProto, helper

import rewriter as rw
from rewriter.codegen.onnx.packing import pack_projections

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-5


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_zoo_llama_projections_pack(tmp_path, target):
    entry = zoo.get("llama-sdpa")
    args, kwargs = entry.inputs(2, 8)
    prog = rw.capture(entry.build(), args, kwargs)
    path = tmp_path / "m.onnx"
    onnx_equals_program(prog, path, target, entry.inputs, [(2, 8), (3, 13)], TOL)
    ops = op_counts(path)
    # per layer: q/k/v packed, o, gate/up packed, down; then the LM head
    assert ops["MatMul"] == 4 * zoo.LAYERS + 1 and ops["Split"] == 2 * zoo.LAYERS
    model = onnx.load(str(path))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    packed = sorted(shapes[n.input[1]] for n in model.graph.node
                    if n.op_type == "MatMul" and n.name.startswith("packed_matmul"))
    qkv = [zoo.E, (zoo.H + 2 * zoo.HKV) * zoo.D]
    gate_up = [zoo.E, 2 * zoo.FFN]
    assert packed == sorted([qkv, gate_up] * zoo.LAYERS)


def test_cross_attention_kv_packs(tmp_path):
    """T5: every decoder layer's cross-attention k/v read the encoder output: all of them pack
    into one MatMul."""
    entry = zoo.get("t5-sdpa")
    args, kwargs = entry.inputs(2, 8)
    prog = rw.capture(entry.build(), args, kwargs)
    path = tmp_path / "m.onnx"
    onnx_equals_program(prog, path, "onnx", entry.inputs, [(2, 8), (3, 11)], TOL)
    model = onnx.load(str(path))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    widths = collections.Counter(shapes[n.input[1]][1] for n in model.graph.node
                                 if n.name.startswith("packed_matmul"))
    inner = zoo.H * zoo.D
    # self-attention q/k/v (3 x inner) in both stacks; the cross k/v of all decoder layers
    assert widths == {3 * inner: 2 * zoo.LAYERS, 2 * zoo.LAYERS * inner: 1}


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
