"""Size reads moved to the graph inputs (rewriter.codegen.onnx.sizes, issue #18).

Positive: a one-axis Shape of a value whose axis has a graph input's symbolic size reads that
input, and two such reads become one after CSE; a decoder's attention sites share their
seqlens_k and total length (zoo, both targets). Negative: full shapes, multi-axis slices,
sizes the exporter wrote as expressions or did not record, and reads already on the input stay.
Numeric: ONNX Runtime gives the same outputs before and after (hand-built), and the zoo decoders
equal their programs (test_onnx_decoder.py, test_onnx_gqa_fold.py run the same exports)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx.sizes import input_axes, sizes_from_graph_inputs

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

FLOAT = ir.DataType.FLOAT


def _value(name: str, *dims) -> ir.Value:
    shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])
    return ir.Value(name=name, type=ir.TensorType(FLOAT), shape=shape)


def _graph():
    """x [batch, sequence, 4], past [batch, 2, past, 4] -> y = Relu(x) (typed [batch,
    sequence, 4], as the exporter types it); outputs: sizes read off y and past."""
    x, past = _value("x", "batch", "sequence", 4), _value("past", "batch", 2, "past", 4)
    relu = ir.Node("", "Relu", [x], name="relu")
    y = relu.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(FLOAT), ir.Shape(
        [ir.SymbolicDim("batch"), ir.SymbolicDim("sequence"), 4])
    reads = {
        "b_of_y": ir.Node("", "Shape", [y], attributes=[ir.AttrInt64("start", 0),
                                                        ir.AttrInt64("end", 1)]),
        "s_of_y": ir.Node("", "Shape", [y], attributes=[ir.AttrInt64("start", -2),
                                                        ir.AttrInt64("end", -1)]),
        "b_of_past": ir.Node("", "Shape", [past], attributes=[ir.AttrInt64("end", 1)]),
        "s_of_x": ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("start", 1),
                                                        ir.AttrInt64("end", 2)]),
        "all_of_y": ir.Node("", "Shape", [y]),
        "two_of_y": ir.Node("", "Shape", [y], attributes=[ir.AttrInt64("end", 2)]),
    }
    outputs = [relu.outputs[0]]
    for name, node in reads.items():
        node.name = name
        node.outputs[0].name = name
        outputs.append(node.outputs[0])
    graph = ir.Graph([x, past], outputs, nodes=[relu, *reads.values()],
                     opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), reads


def _run(model: ir.Model, feed) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def test_input_axes_are_the_first_input_with_each_name():
    model, _ = _graph()
    found = {name: (v.name, axis) for name, (v, axis) in input_axes(model.graph).items()}
    assert found == {"batch": ("x", 0), "sequence": ("x", 1), "past": ("past", 2)}


def test_one_axis_reads_move_to_the_graph_input_and_compute_the_same():
    model, reads = _graph()
    feed = {"x": np.ones((3, 5, 4), np.float32), "past": np.ones((3, 2, 7, 4), np.float32)}
    before = _run(model, feed)
    assert sizes_from_graph_inputs(model) == 3  # b_of_y, s_of_y, b_of_past
    moved = {name: (node.inputs[0].name, node.attributes.get_int("start", 0),
                    node.attributes.get_int("end")) for name, node in reads.items()}
    assert moved["b_of_y"] == moved["b_of_past"] == ("x", 0, 1)
    assert moved["s_of_y"] == moved["s_of_x"] == ("x", 1, 2)
    # left alone: already on the input, the whole shape, two axes
    assert moved["all_of_y"][0] == moved["two_of_y"][0] == "y"
    for got, want in zip(_run(model, feed), before, strict=True):
        np.testing.assert_array_equal(got, want)
    CommonSubexpressionEliminationPass()(model)
    shapes = collections.Counter(n.inputs[0].name for n in model.graph if n.op_type == "Shape")
    assert shapes == {"x": 2, "y": 2}  # batch and sequence once each; the two left alone


def test_expressions_and_unknown_sizes_stay():
    """A size the exporter wrote as an expression, a name no input has, an untyped value."""
    x = _value("x", "batch", "sequence", 4)
    concat = ir.Node("", "Concat", [x, x], attributes=[ir.AttrInt64("axis", 1)])
    concat.outputs[0].shape = ir.Shape([ir.SymbolicDim("batch"),
                                        ir.SymbolicDim("2*sequence"), 4])
    relu = ir.Node("", "Relu", [x])
    relu.outputs[0].shape = ir.Shape([ir.SymbolicDim("s77"), ir.SymbolicDim("sequence"), 4])
    neg = ir.Node("", "Neg", [x])  # no shape recorded
    nodes = [concat, relu, neg] + [
        ir.Node("", "Shape", [v], attributes=[ir.AttrInt64("start", a), ir.AttrInt64("end", a + 1)])
        for v, a in ((concat.outputs[0], 1), (relu.outputs[0], 0), (neg.outputs[0], 1))]
    graph = ir.Graph([x], [n.outputs[0] for n in nodes[3:]], nodes=nodes,
                     opset_imports={"": 23})
    assert sizes_from_graph_inputs(ir.Model(graph, ir_version=10)) == 0


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_decoder_sites_share_their_sizes(tmp_path, target):
    """The zoo Llama decoder: every size read names a graph input after the export, so each
    (input, axis) is read once, whatever the layer count."""
    entry = zoo.get("llama-sdpa")
    prog = rw.capture(entry.build(), (zoo._ids(2, 8),), {"use_cache": False})
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(prog, path, target, kv_cache=True)
    graph = onnx.load(str(path)).graph
    inputs = {i.name for i in graph.input}
    reads = [(n.input[0], tuple(onnx.helper.get_attribute_value(a) for a in n.attribute))
             for n in graph.node if n.op_type == "Shape"]
    assert reads and all(name in inputs for name, _ in reads), reads
    assert len(reads) == len(set(reads)), reads
