"""RoPE lowering (issue #18): the rotate-half chains torch.onnx writes for rotary position
embeddings become one ``RotaryEmbedding`` op (opset 23) per rotated tensor, on both targets.

Shape glossary: x [B, H, S, D] (a query or key, BNSH), c [b, S, D] with b in {1, B} (the
model's cos or sin per position, both halves equal), R = the rotated width (D, or fewer for
partial rotary).

The chain, as Hugging Face writes it (``q * cos + rotate_half(q) * sin``) and torch.onnx emits
it, any operand order:

    Add(Mul(x, Unsqueeze(cos, 1)),
        Mul(Concat(Neg(Slice(x, R/2, R)), Slice(x, 0, R/2), axis=-1), Unsqueeze(sin, 1)))

becomes ``RotaryEmbedding(x, cos[..., :R/2], sin[..., :R/2], interleaved=0)``. Taking the first
half of the tables is exact only where their two halves are equal, which is proved on the
graph: cos and sin must be ``Cos``/``Sin`` of ``Concat(f, f)`` on the last axis, then scalar
Mul/Div (the rope scaling) or Cast. Partial rotary (``cat(rope(x[..., :R]), x[..., R:])``, Phi,
GPT-NeoX, StableLM) becomes one op with ``rotary_embedding_dim=R``.

Why not onnxscript's own RoPE fusions: its opset-23 rule does not see through the rope
scaling Mul that transformers writes (``cos * attention_scaling``, even when 1.0), and its ORT
rule targets a cos/sin cache form that needs a maximum position.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

# the types ONNX Runtime's CPU RotaryEmbedding kernel takes (float32, float16)
_ROPE_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
_INT64_MAX = np.iinfo(np.int64).max
# ops a cos/sin table may pass through after Cos/Sin without changing which halves are equal
_ELEMENTWISE = frozenset({"Cast", "Identity"})
_BY_SCALAR = frozenset({"Mul", "Div"})


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ints(value: ir.Value | None) -> list[int] | None:
    array = _const(value)
    return None if array is None else [int(a) for a in array.reshape(-1)]


def _last_axis(axis: int, rank: int) -> bool:
    return axis in (-1, rank - 1)


def doubled_angle(table: ir.Value, trig: str) -> ir.Value | None:
    """The angles f where ``table`` is ``trig(Concat(f, f, axis=-1))`` up to Casts and scalar
    Mul/Div (so both halves of its last axis are equal), else None."""
    value = table
    while (node := value.producer()) is not None:
        if node.op_type == trig:
            inner = node.inputs[0].producer()
            if inner is None or inner.op_type != "Concat" or len(inner.inputs) != 2 \
                    or inner.inputs[0] is not inner.inputs[1]:
                return None
            rank = None if inner.outputs[0].shape is None else len(inner.outputs[0].shape)
            axis = inner.attributes.get_int("axis", 0)
            return inner.inputs[0] if rank is not None and _last_axis(axis, rank) else None
        if node.op_type in _ELEMENTWISE:
            value = node.inputs[0]
        elif node.op_type in _BY_SCALAR and len(node.inputs) == 2:
            a, b = node.inputs
            if b is not None and _const(b) is not None and _const(b).size == 1:
                value = a
            elif node.op_type == "Mul" and a is not None and _const(a) is not None \
                    and _const(a).size == 1:
                value = b
            else:
                return None
        else:
            return None
    return None


class RotateHalfRoPE(pattern.RewriteRuleClassBase):
    """``x * cos + rotate_half(x) * sin`` on x [B, H, S, D] -> RotaryEmbedding (opset 23)."""

    def pattern(self, op, x, cos, sin, s1, e1, a1, s2, e2, a2):
        first = op.Slice(x, s1, e1, a1, _allow_other_inputs=True, _outputs=["first"])
        second = op.Slice(x, s2, e2, a2, _allow_other_inputs=True, _outputs=["second"])
        rotated = op.Concat(op.Neg(second), first, _allow_other_attributes=True,
                            _outputs=["rotated"])
        cos4 = op.Unsqueeze(cos, _allow_other_inputs=True, _outputs=["cos4"])
        sin4 = op.Unsqueeze(sin, _allow_other_inputs=True, _outputs=["sin4"])
        return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))

    def check(self, context, x, cos, sin, s1, e1, a1, s2, e2, a2, first, second, rotated,
              cos4, sin4, **_):
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [B, H, S, D] with a static head size", x)
        if x.dtype not in _ROPE_TYPES or not (x.dtype == cos.dtype == sin.dtype):
            return result.fail(f"types {x.dtype}/{cos.dtype}/{sin.dtype}: the kernel takes "
                               "one of float32, float16 for all three", x)
        d = x.shape[3]
        for axes in (a1, a2):
            if _ints(axes) not in ([-1], [3]):
                return result.fail("a slice is not on the last axis", axes)
        for node in (first.producer(), second.producer()):
            if len(node.inputs) > 4 and _ints(node.inputs[4]) != [1]:
                return result.fail("a slice has a step other than 1", node)
        start1, end1, start2, end2 = (_ints(v) for v in (s1, e1, s2, e2))
        if None in (start1, end1, start2, end2):
            return result.fail("slice bounds are not constants", x)
        if not (d % 2 == 0 and start1 == [0] and end1 == start2 == [d // 2]
                and end2[0] >= d):
            return result.fail(f"the slices [0:{end1[0]}] and [{start2[0]}:{end2[0]}] are "
                               "not the two halves of x", x)
        if not _last_axis(rotated.producer().attributes.get_int("axis", 0), 4):
            return result.fail("the rotation is not concatenated on the last axis", rotated)
        for table, table4 in ((cos, cos4), (sin, sin4)):
            if _ints(table4.producer().inputs[1]) != [1]:
                return result.fail("cos/sin are not unsqueezed on the head axis", table4)
            if table.shape is None or len(table.shape) != 3 or table.shape[2] != d:
                return result.fail("cos/sin are not [b, S, D]", table)
        if doubled_angle(cos, "Cos") is None or doubled_angle(sin, "Sin") is None:
            return result.fail("cannot prove the two halves of cos/sin equal (not Cos/Sin of "
                               "Concat(f, f) on the last axis)", cos)
        return result

    def rewrite(self, op, x, cos, sin, **_):
        half = x.shape[3] // 2
        return _like(op.RotaryEmbedding(x, _half_table(op, cos, half, x),
                                        _half_table(op, sin, half, x), interleaved=0), x)


def _like(y: ir.Value, x: ir.Value) -> ir.Value:
    """y with x's shape and type (a rotation keeps both; onnx cannot infer the new node's)."""
    y.shape, y.dtype = x.shape, x.dtype
    return y


def _half_table(op, table, half: int, x):
    """table[..., :half] [b, S, half] broadcast to x's batch: ONNX Runtime's kernel wants the
    tables [B, S, R/2] exactly when no position_ids are given."""
    sliced = op.Slice(table, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]),
                      op.Constant(value_ints=[-1]))
    sliced.shape, sliced.dtype = ir.Shape([table.shape[0], table.shape[1], half]), table.dtype
    if table.shape[0] == 1:
        sliced = op.Expand(sliced, op.Concat(_batch(op, x), op.Constant(value_ints=[1, 1]),
                                             axis=0))
        sliced.shape, sliced.dtype = ir.Shape([x.shape[0], table.shape[1], half]), table.dtype
    return sliced


def _batch(op, x):
    """[1] int64: x's batch size, read off the graph input that has the same symbolic batch
    dimension where there is one (so that every site's tables are one value after CSE)."""
    dim = x.shape[0]
    if isinstance(dim, int):
        return op.Constant(value_ints=[dim])
    graph = x.producer().graph if x.producer() is not None else None
    if isinstance(dim, ir.SymbolicDim) and dim.value is not None and graph is not None:
        for value in graph.inputs:
            if value.shape is None:
                continue
            for axis, d in enumerate(value.shape):
                if isinstance(d, ir.SymbolicDim) and d.value == dim.value:
                    return op.Shape(value, start=axis, end=axis + 1)
    return op.Shape(x, start=0, end=1)


class PartialRoPE(pattern.RewriteRuleClassBase):
    """``cat(RotaryEmbedding(x[..., :R]), x[..., R:])`` -> RotaryEmbedding(x,
    rotary_embedding_dim=R): partial rotary as one op on the whole head."""

    def pattern(self, op, x, end1, start2, cos, sin):
        rotated = op.RotaryEmbedding(op.Slice(x, _allow_other_inputs=True, _outputs=["head"]),
                                     cos, sin, _allow_other_attributes=True,
                                     _outputs=["rotated"])
        rest = op.Slice(x, _allow_other_inputs=True, _outputs=["tail"])
        return op.Concat(rotated, rest, _allow_other_attributes=True, _outputs=["joined"])

    def check(self, context, x, head, tail, rotated, joined, **_):
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [B, H, S, D] with a static head size", x)
        d = x.shape[3]
        bounds = []
        for value in (head, tail):
            node = value.producer()
            ins = [_ints(v) for v in node.inputs[1:]]
            if len(ins) < 3 or None in ins or ins[2] not in ([-1], [3]) \
                    or (len(ins) > 3 and ins[3] != [1]):
                return result.fail("not a constant slice of the last axis", node)
            bounds.append((ins[0][0], ins[1][0]))
        (s1, e1), (s2, e2) = bounds
        if not (s1 == 0 and 0 < e1 < d and s2 == e1 and (e2 >= d)):
            return result.fail(f"slices [{s1}:{e1}] and [{s2}:{e2}] do not split the head", x)
        attrs = rotated.producer().attributes
        if attrs.get_int("interleaved", 0) != 0 or "rotary_embedding_dim" in attrs:
            return result.fail("not a plain rotate-half RotaryEmbedding", rotated)
        if not _last_axis(joined.producer().attributes.get_int("axis", 0), 4):
            return result.fail("not concatenated on the last axis", joined)
        self._dim = e1
        return result

    def rewrite(self, op, x, cos, sin, **_):
        return _like(op.RotaryEmbedding(x, cos, sin, interleaved=0,
                                        rotary_embedding_dim=self._dim), x)


class RoPEBeforeHeadSplit(pattern.RewriteRuleClassBase):
    """``RotaryEmbedding(Transpose(Reshape(y, [B, S, H, D]), [0, 2, 1, 3]))`` ->
    ``Transpose(Reshape(RotaryEmbedding(y, num_heads=H)))``: the op on the projection's output
    [B, S, H*D], so that the head split's Transpose meets the contrib ops' packing Transpose
    (and the clean-up cancels both)."""

    def pattern(self, op, y, shape, cos, sin):
        heads = op.Transpose(op.Reshape(y, shape, _allow_other_attributes=True,
                                        _outputs=["split"]),
                             perm=[0, 2, 1, 3])
        return op.RotaryEmbedding(heads, cos, sin, _allow_other_attributes=True,
                                  _outputs=["rotated"])

    def check(self, context, y, split, rotated, **_):
        result = pattern.MatchResult()
        if y.shape is None or len(y.shape) != 3:
            return result.fail("the projection is not [B, S, H*D]", y)
        if split.shape is None or len(split.shape) != 4 \
                or not all(isinstance(d, int) for d in split.shape[2:]):
            return result.fail("the head split is not [B, S, H, D] with static H, D", split)
        if rotated.producer().attributes.get_int("interleaved", 0) != 0:
            return result.fail("interleaved rotary", rotated)
        return result

    def rewrite(self, op, y, shape, cos, sin, split, rotated, **_):
        attrs = {k: v.value for k, v in rotated.producer().attributes.items()}
        z = _like(op.RotaryEmbedding(y, cos, sin, **{**attrs, "num_heads": split.shape[2]}), y)
        return op.Transpose(op.Reshape(z, shape, allowzero=split.producer().attributes
                                       .get_int("allowzero", 0)), perm=[0, 2, 1, 3])


class ShapeOfRotation(pattern.RewriteRuleClassBase):
    """``Shape(RotaryEmbedding(x))`` -> ``Shape(x)`` (a rotation keeps the shape): once
    GroupQueryAttention rotates q and k itself, the size reads are all that would keep the
    RotaryEmbedding ops alive."""

    def pattern(self, op, x):
        return op.Shape(op.RotaryEmbedding(x, _allow_other_inputs=True,
                                           _allow_other_attributes=True),
                        _allow_other_attributes=True, _outputs=["size"])

    def rewrite(self, op, x, size, **_):
        attrs = {k: v.value for k, v in size.producer().attributes.items()}
        return op.Shape(x, **attrs)


SHAPE_RULES = pattern.RewriteRuleSet([ShapeOfRotation.rule("ShapeOfRotation",
                                                           remove_nodes=False)])

# remove_nodes=False: q and k share the Unsqueezed tables; unused nodes go after all rules
ROPE_RULES = pattern.RewriteRuleSet([RotateHalfRoPE.rule("RotateHalfRoPE", remove_nodes=False)],
                                    commute=True)
PARTIAL_ROPE_RULES = pattern.RewriteRuleSet([PartialRoPE.rule("PartialRoPE",
                                                             remove_nodes=False)])
BEFORE_SPLIT_RULES = pattern.RewriteRuleSet([RoPEBeforeHeadSplit.rule("RoPEBeforeHeadSplit")])


def lower_rope(model: ir.Model) -> int:
    """Rewrite every rotate-half chain of ``model`` (in place) as RotaryEmbedding where ONNX
    Runtime runs it; returns how many (partial ones counted once)."""
    if not ort_runs_rotary_embedding():
        return 0
    count = ROPE_RULES.apply_to_model(model)
    if count:
        PARTIAL_ROPE_RULES.apply_to_model(model)
        BEFORE_SPLIT_RULES.apply_to_model(model)
    return count


@functools.cache
def ort_runs_rotary_embedding() -> bool:
    """Whether the installed ONNX Runtime runs RotaryEmbedding (opset 23) with 4-D input and
    per-token tables; True where ONNX Runtime is not installed (the op is standard ONNX)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return True
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 2])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 2])
    graph = helper.make_graph([helper.make_node("RotaryEmbedding", ["x", "t", "t"], ["y"])],
                              "probe", [x, t], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.array([[[[1.0, 2.0]]]], np.float32),
                              "t": np.ones((1, 1, 1), np.float32)})[0]
    except Exception:  # onnxruntime's own NOT_IMPLEMENTED / INVALID_GRAPH types
        return False
    return bool(np.allclose(out, [[[[1.0 - 2.0, 2.0 + 1.0]]]]))
