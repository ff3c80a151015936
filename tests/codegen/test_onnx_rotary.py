"""RoPE lowering (rewriter.codegen.onnx.rotary, issue #18): the rotate-half chains of zoo models
become RotaryEmbedding (opset 23) on both targets, partial rotary included, with the exports
equal to their programs (fp32, relative 1e-5); chains whose cos/sin halves cannot be proved
equal, or whose slices are not the two halves, stay; and the head split's Transposes cancel
against the contrib ops' packing once the op runs on the projection's [B, S, H*D] output."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attn_testlib import onnx_equals_program
from onnx import TensorProto, helper

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx import lean, rotary

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-5
SHAPES = [(2, 8), (3, 13)]
ROPE_CHAIN = {"Neg"}  # rotate_half's negation: gone when every chain is lowered
SPLIT_CANCELS = {"llama-sdpa", "qwen2-eager", "mistral-sdpa", "phi3-sdpa"}


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def rope_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "RotaryEmbedding"]


@pytest.fixture(scope="module")
def captured():
    cache: dict[str, rw.Program] = {}

    def get(name: str):
        if name not in cache:
            args, kwargs = zoo.get(name).inputs(*SHAPES[0])
            cache[name] = rw.capture(zoo.get(name).build(), args, kwargs)
        return cache[name]

    return get


# --- zoo models ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2-eager", "mistral-sdpa", "gemma3-sdpa",
                                  "phi3-sdpa"])
def test_rope_lowered(captured, tmp_path, name, target):
    onnx_equals_program(captured(name), tmp_path / "m.onnx", target, zoo.get(name).inputs,
                        SHAPES, TOL)
    ops = op_counts(tmp_path / "m.onnx")
    assert ops["RotaryEmbedding"] == 2 * zoo.LAYERS, ops  # q and k in every layer
    assert not ROPE_CHAIN & set(ops), ops
    if target == "ort" and name in SPLIT_CANCELS:  # the head split and the packing for
        # GroupQueryAttention cancel (Gemma3's per-head q/k norms sit between them)
        graph = onnx.load(str(tmp_path / "m.onnx")).graph
        producers = {o: n for n in graph.node for o in n.output}

        def through_reshapes(name: str) -> str:
            while name in producers and producers[name].op_type == "Reshape":
                name = producers[name].input[0]
            return producers[name].op_type if name in producers else "input"

        for node in graph.node:
            if node.op_type == "GroupQueryAttention":
                assert {through_reshapes(i) for i in node.input[:3]} <= {
                    "RotaryEmbedding", "Split", "Slice", "MatMul", "Add"}, node


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", ["phi-sdpa", "gpt-neox-sdpa", "stablelm-sdpa"])
def test_partial_rope_lowered(captured, tmp_path, name, target):
    """cat(rope(x[..., :R]), x[..., R:]) -> one RotaryEmbedding with rotary_embedding_dim R."""
    onnx_equals_program(captured(name), tmp_path / "m.onnx", target, zoo.get(name).inputs,
                        SHAPES, TOL)
    nodes = rope_nodes(tmp_path / "m.onnx")
    assert len(nodes) == 2 * zoo.LAYERS
    dims = {a.i for n in nodes for a in n.attribute if a.name == "rotary_embedding_dim"}
    assert len(dims) == 1 and 0 < dims.pop() < captured(name).sites[0].head_dim
    assert "Neg" not in op_counts(tmp_path / "m.onnx")


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_rope_lowered_in_decoder(tmp_path, target):
    """The decoder step (positions P..P+S-1): greedy tokens equal the PyTorch decoder's."""
    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 9),), {"use_cache": False})
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(prog, path, target, kv_cache=True)
    assert op_counts(path)["RotaryEmbedding"] == 2 * zoo.LAYERS
    ids = zoo._ids(3, 6, seed=4)
    got = rwonnx.generate(rwonnx.session(path), ids, 8)
    assert np.array_equal(got.numpy(), prog.decoder().generate(ids, 8).numpy())


# --- the rules on hand-built chains ------------------------------------------------------

B, H, S, D = 2, 3, 5, 8


def rope_chain(*, second_angle: bool = False, halves=None, scale: float = 1.0,
               partial: int | None = None) -> ir.Model:
    """y = x * cos + rotate_half(x) * sin as torch.onnx writes it, x [B, H, S, D], the tables
    from positions: cos = Cos(Concat(f, f)) * scale, f = pos x inv_freq; ``second_angle``:
    Concat(f, f + 1), whose halves differ; ``halves``: where the slices split x;
    ``partial``: rotate x[..., :partial] and concatenate the rest."""
    r = partial or D
    halves = halves or (r // 2, r // 2)
    inv = helper.make_tensor("inv", TensorProto.FLOAT, [r // 2],
                             (1.0 / 10000 ** (np.arange(r // 2) * 2 / r)).astype(np.float32))
    ints = {
        "one": [1], "last": [-1], "zero": [0], "cut": [halves[0]], "from": [halves[1]],
        "end": [np.iinfo(np.int64).max], "r": [r],
    }
    inits = [inv, helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("shift", TensorProto.FLOAT, [], [1.0])]
    inits += [helper.make_tensor(k, TensorProto.INT64, [1], v) for k, v in ints.items()]
    nodes = [
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["posf", "last"], ["pos3"]),  # [1, S, 1]
        helper.make_node("Mul", ["pos3", "inv"], ["f"]),  # [1, S, r/2]
    ]
    if second_angle:
        nodes.append(helper.make_node("Add", ["f", "shift"], ["g"]))
    nodes += [
        helper.make_node("Concat", ["f", "g" if second_angle else "f"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos0"]), helper.make_node("Sin", ["emb"], ["sin0"]),
        helper.make_node("Mul", ["cos0", "scale"], ["cos"]),
        helper.make_node("Mul", ["sin0", "scale"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", "one"], ["cos4"]),
        helper.make_node("Unsqueeze", ["sin", "one"], ["sin4"]),
    ]
    x = "x"
    if partial:
        nodes += [helper.make_node("Slice", ["x", "zero", "r", "last"], ["xr"]),
                  helper.make_node("Slice", ["x", "r", "end", "last"], ["xp"])]
        x = "xr"
    nodes += [
        helper.make_node("Slice", [x, "zero", "cut", "last", "one"], ["x1"]),
        helper.make_node("Slice", [x, "from", "end", "last", "one"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
        helper.make_node("Mul", [x, "cos4"], ["a"]),
        helper.make_node("Mul", ["rot", "sin4"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["yr" if partial else "y"]),
    ]
    if partial:
        nodes.append(helper.make_node("Concat", ["yr", "xp"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, S, D]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [1, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return ir.serde.deserialize_model(model)


def lowered_equals(model: ir.Model) -> collections.Counter:
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((B, H, S, D)).astype(np.float32),
            "pos": np.arange(3, 3 + S, dtype=np.int64)[None]}

    def run() -> np.ndarray:
        proto = ir.serde.serialize_model(model)
        onnx.checker.check_model(proto)
        sess = ort.InferenceSession(proto.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, feed)[0]

    want = run()
    lean.lower(model, "onnx")
    got = run()
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("scale", [1.0, 0.7], ids=["unscaled", "scaled"])
def test_rule_rotate_half(scale):
    ops = lowered_equals(rope_chain(scale=scale))
    assert ops["RotaryEmbedding"] == 1 and "Neg" not in ops, ops


def test_rule_partial():
    model = rope_chain(partial=4)
    ops = lowered_equals(model)
    assert ops["RotaryEmbedding"] == 1 and "Neg" not in ops and "Slice" in ops, ops
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.attributes.get_int("rotary_embedding_dim") == 4
    assert node.inputs[0].name == "x"  # the whole head, not its rotated part


@pytest.mark.parametrize("chain", [dict(second_angle=True), dict(halves=(3, 3)),
                                   dict(halves=(5, 5))],
                         ids=["unequal-halves", "short-first", "long-first"])
def test_rule_leaves_other_chains(chain):
    """cos = Cos(Concat(f, f + 1)): taking its first half would drop the second angle; slices
    that are not the two halves of x are another function."""
    model = rope_chain(**chain)
    before = collections.Counter(n.op_type for n in model.graph)
    ops = lowered_equals(model)
    assert "RotaryEmbedding" not in ops and ops["Neg"] == before["Neg"] == 1, ops


def test_doubled_angle_sees_through_casts_and_scalars():
    model = rope_chain(scale=0.5)
    cos = next(n for n in model.graph if n.op_type == "Unsqueeze"
               and n.outputs[0].name == "cos4").inputs[0]
    assert rotary.doubled_angle(cos, "Cos").name == "f"
    assert rotary.doubled_angle(cos, "Sin") is None  # a cos table is not a sin table
    assert rotary.doubled_angle(rope_chain(second_angle=True).graph.inputs[0], "Cos") is None
