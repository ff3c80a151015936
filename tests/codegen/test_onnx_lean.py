"""Lean ONNX graphs (rewriter.codegen.onnx.lean, issue #18): exports create ONNX Runtime
sessions without warnings; RMSNorm chains become RMSNormalization (both targets) and, on
"ort", residual Add + RMSNorm / LayerNorm become com.microsoft.SkipSimplifiedLayerNormalization
/ SkipLayerNormalization, by pattern: zoo models equal their programs (fp32, relative 1e-5)
with the fused ops in the graph and the old chains gone, and chains that are not a
normalization (other axis, no epsilon, another power, a non-constant epsilon) stay."""

from __future__ import annotations

import collections
import contextlib
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attn_testlib import onnx_equals_program, ort_messages, quiet_session
from onnx import TensorProto, helper

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.codegen.onnx import lean

ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("zoo")

TOL = 1e-5
SHAPES = [(2, 8), (3, 13)]
RMS_CHAIN = {"Pow", "ReduceMean", "Sqrt", "Reciprocal"}


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def captured():
    cache: dict[str, rw.Program] = {}

    def get(name: str, lm: bool = False):
        key = f"{name}:{lm}"
        if key not in cache:
            entry = zoo.get(name)
            if lm:  # a causal LM as decoders capture it (rewriter.decoder)
                cache[key] = rw.capture(entry.build(), (zoo._ids(2, 9),), {"use_cache": False})
            else:
                args, kwargs = entry.inputs(*SHAPES[0])
                cache[key] = rw.capture(entry.build(), args, kwargs)
        return cache[key]

    return get


# --- 1. no warnings --------------------------------------------------------------------------

@pytest.mark.parametrize("kv_cache", [False, True], ids=["prefill", "kv-cache"])
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_zoo_session_logs_no_warnings(captured, tmp_path, capfd, target, kv_cache):
    prog = captured("llama-sdpa", lm=kv_cache)
    capfd.readouterr()
    rwonnx.export_onnx(prog, tmp_path / "m.onnx", target, kv_cache=kv_cache)
    quiet_session(tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert not ort_messages(out + err), ort_messages(out + err)
    assert "CastLike" not in op_counts(tmp_path / "m.onnx")


@contextlib.contextmanager
def torch_warnings():
    """The WARNING records torch's loggers emit meanwhile: torch's logging gives some of its
    loggers their own handlers and propagate=False, so one handler on each is needed."""
    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append
    loggers = [logging.getLogger(name) for name in ["torch", *logging.root.manager.loggerDict]
               if name == "torch" or name.startswith("torch.")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield said
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_static_batch_decoder_exports_without_warnings(tmp_path):
    """A capture with one row pins the batch (torch.export specializes 1): its decoder's
    batch axis is declared static, not None, which torch.export warns is deprecated."""
    entry = zoo.get("llama-sdpa")
    prog = rw.capture(entry.build(), (zoo._ids(1, 9),), {"use_cache": False})
    assert prog.decoder().static_batch == 1
    with torch_warnings() as said:
        rwonnx.export_onnx(prog, tmp_path / "d.onnx", "ort", kv_cache=True)
    assert not [r for r in said if "dynamic shape" in r.getMessage()], \
        [r.getMessage() for r in said]


@pytest.mark.slow
def test_smollm2_sessions_log_no_warnings(tmp_path, capfd):
    """The prefill graphs; the decoder graphs are checked the same way where SmolLM2's
    decoders are exported (test_onnx_decoder.py::test_smollm2_dense_generation)."""
    from rewriter.models import load

    prog = load("smollm2-135m").capture(16)
    for kv_cache in (False,):
        for target in ("onnx", "ort"):
            path = tmp_path / f"{target}-{kv_cache}.onnx"
            capfd.readouterr()
            rwonnx.export_onnx(prog, path, target, kv_cache=kv_cache)
            quiet_session(path)
            out, err = capfd.readouterr()
            assert not ort_messages(out + err), (target, kv_cache, ort_messages(out + err))
            ops = op_counts(path)
            assert not RMS_CHAIN & set(ops) and "CastLike" not in ops, (target, kv_cache)


# --- 2. fused normalizations on zoo models ------------------------------------------------

@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2-sdpa", "phi3-sdpa"])
def test_rms_norm_lowered(captured, tmp_path, name, target):
    prog = captured(name)
    entry = zoo.get(name)
    onnx_equals_program(prog, tmp_path / "m.onnx", target, entry.inputs, SHAPES, TOL)
    ops = op_counts(tmp_path / "m.onnx")
    assert not RMS_CHAIN & set(ops), ops
    norms = 2 * zoo.LAYERS + 1  # input and post-attention norms per layer, and the final one
    if target == "onnx":
        assert ops["RMSNormalization"] == norms
        assert "SkipSimplifiedLayerNormalization" not in ops
    else:  # every norm but the first (on the embeddings) reads a residual Add
        assert ops["RMSNormalization"] == 1
        assert ops["SkipSimplifiedLayerNormalization"] == norms - 1


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_rms_norm_lowered_in_decoder(captured, tmp_path, target):
    from rewriter.decoder import build_decoder

    prog = captured("llama-sdpa", lm=True)
    dec = build_decoder(prog)
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(prog, path, target, kv_cache=True)
    ops = op_counts(path)
    assert not RMS_CHAIN & set(ops), ops
    fused = ops["RMSNormalization"] + ops["SkipSimplifiedLayerNormalization"]
    assert fused == 2 * zoo.LAYERS + 1
    ids = zoo._ids(2, 7)
    sess = rwonnx.session(path)
    past = dec.empty_cache(2)
    names = dec.input_names[1:]
    feed = {"input_ids": ids[:, :4].numpy(), **{n: t.numpy() for n, t in zip(names, past,
                                                                            strict=True)}}
    got, *present = sess.run(None, feed)
    want, cache = dec.step(ids[:, :4], past)
    assert np.abs(got - want.numpy()).max() <= TOL * np.abs(want.numpy()).max()
    feed = {"input_ids": ids[:, 4:5].numpy(), **dict(zip(names, present, strict=True))}
    got, *_ = sess.run(None, feed)
    want, _ = dec.step(ids[:, 4:5], cache)
    assert np.abs(got - want.numpy()).max() <= TOL * np.abs(want.numpy()).max()


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_layer_norm_residual_lowered(captured, tmp_path, target):
    prog = captured("gpt2-sdpa")
    onnx_equals_program(prog, tmp_path / "m.onnx", target, zoo.get("gpt2-sdpa").inputs, SHAPES,
                        TOL)
    ops = op_counts(tmp_path / "m.onnx")
    norms = 2 * zoo.LAYERS + 1  # ln_1 and ln_2 per layer, ln_f
    if target == "onnx":
        assert ops["LayerNormalization"] == norms and "SkipLayerNormalization" not in ops
    else:  # ln_1 of layer 0 reads the embeddings (wte + wpe: an Add of [B, S, D] and
        # [1, S, D], not two [B, S, D] tensors), so it stays
        assert ops["SkipLayerNormalization"] == norms - 1
        assert ops["LayerNormalization"] == 1


# --- the rules on hand-built chains ------------------------------------------------------

D = 8


def rms_chain(*, axes=(-1,), eps: float | None = 1e-6, power: float = 2.0, div: bool = False,
              residual: bool = False, eps_input: bool = False, half: bool = False) -> ir.Model:
    """y = w * (x / sqrt(mean(x^2, axes) + eps)) on x [2, 3, D] as torch.onnx writes it;
    ``residual``: x = a + b, with the sum also an output (the residual stream)."""
    ft = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes, inits = [], [
        helper.make_tensor("w", ft, [D], np.linspace(0.5, 1.5, D).astype(
            np.float16 if half else np.float32)),
        helper.make_tensor("p", TensorProto.FLOAT, [], [power]),
        helper.make_tensor("axes", TensorProto.INT64, [len(axes)], list(axes))]
    inputs = [helper.make_tensor_value_info("a", ft, [2, 3, D])]
    outputs = [helper.make_tensor_value_info("y", ft, [2, 3, D])]
    x = "a"
    if residual:
        inputs.append(helper.make_tensor_value_info("b", ft, [2, 3, D]))
        nodes.append(helper.make_node("Add", ["a", "b"], ["x"]))
        outputs.append(helper.make_tensor_value_info("x", ft, [2, 3, D]))
        x = "x"
    if half:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    nodes += [helper.make_node("Pow", [x, "p"], ["sq"]),
              helper.make_node("ReduceMean", ["sq", "axes"], ["ms"])]
    var = "ms"
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, []))
        nodes.append(helper.make_node("Add", ["ms", "eps"], ["var"]))
        var = "var"
    elif eps is not None:
        inits.append(helper.make_tensor("eps", TensorProto.FLOAT, [], [eps]))
        nodes.append(helper.make_node("Add", ["ms", "eps"], ["var"]))
        var = "var"
    nodes.append(helper.make_node("Sqrt", [var], ["std"]))
    if div:
        nodes.append(helper.make_node("Div", [x, "std"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["r"]),
                  helper.make_node("Mul", [x, "r"], ["n"])]
    n = "n"
    if half:
        nodes.append(helper.make_node("Cast", ["n"], ["nh"], to=TensorProto.FLOAT16))
        n = "nh"
    nodes.append(helper.make_node("Mul", ["w", n], ["y"]))
    graph = helper.make_graph(nodes, "rms", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v for k, v in feed.items()
                           if k in {i.name for i in sess.get_inputs()}})


def lowered_equals(model: ir.Model, target: str, tol: float = TOL, half: bool = False
                   ) -> collections.Counter:
    rng = np.random.default_rng(0)
    dtype = np.float16 if half else np.float32
    feed = {n: rng.standard_normal((2, 3, D)).astype(dtype) for n in ("a", "b")}
    feed["eps"] = np.asarray(1e-6, dtype=np.float32)
    want = run(model, feed)
    lean.lower(model, target)
    got = run(model, feed)
    for g, w in zip(got, want, strict=True):
        w = w.astype(np.float32)
        assert np.abs(g.astype(np.float32) - w).max() <= tol * np.abs(w).max()
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("form", ["reciprocal", "div", "axis-2", "float16-cast"])
def test_rule_rms_forms(target, form):
    half = form == "float16-cast"
    model = rms_chain(div=form == "div", axes=(2,) if form == "axis-2" else (-1,), half=half)
    ops = lowered_equals(model, target, tol=1e-3 if half else TOL, half=half)
    assert ops == {"RMSNormalization": 1}, ops


def test_rule_skip_rms():
    ops = lowered_equals(rms_chain(residual=True), "ort")
    assert ops == {"SkipSimplifiedLayerNormalization": 1}, ops
    ops = lowered_equals(rms_chain(residual=True), "onnx")
    assert ops == {"Add": 1, "RMSNormalization": 1}, ops


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("chain", [dict(axes=(1,)), dict(axes=(1, 2)), dict(eps=None),
                                   dict(power=4.0), dict(eps_input=True)],
                         ids=["other-axis", "two-axes", "no-eps", "fourth-power", "eps-input"])
def test_rule_leaves_other_chains(target, chain):
    """A chain that is not an RMSNorm over the last axis with a constant epsilon stays."""
    model = rms_chain(**chain)
    before = collections.Counter(n.op_type for n in model.graph)
    assert lowered_equals(model, target) == before


def test_skip_layer_norm_needs_matching_shapes():
    """Add([B, S, D], [1, S, D]) + LayerNorm stays: the Skip ops take two [B, S, D]."""
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, D])
    pos = helper.make_tensor("pos", TensorProto.FLOAT, [1, 3, D],
                             np.arange(3 * D, dtype=np.float32) / 10)
    g = helper.make_tensor("g", TensorProto.FLOAT, [D], np.ones(D, np.float32))
    b = helper.make_tensor("beta", TensorProto.FLOAT, [D], np.zeros(D, np.float32))
    nodes = [helper.make_node("Add", ["a", "pos"], ["x"]),
             helper.make_node("LayerNormalization", ["x", "g", "beta"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "ln", [x], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [2, 3, D])], [pos, g, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    ops = lowered_equals(ir.serde.deserialize_model(model), "ort")
    assert ops == {"Add": 1, "LayerNormalization": 1}, ops
