"""Lean ONNX graphs: clean up and lower what torch.onnx emits before it is written (issue #18).

``lower(model, target)`` runs in place, after the export and before the write:

1. size reads move to the graph inputs that have the same symbolic size
   (codegen/onnx/sizes.py), so that CSE leaves one seqlens_k, total_sequence_length and
   cos/sin cache per model instead of one per layer;
2. constant folding (onnxscript's folder, with onnx's shape inference; nodes that read a
   weight-sized constant, such as the Transpose of a MatMul weight, are left to ONNX Runtime,
   which would otherwise double the export's memory): the CastLike(constant, x) that the
   translations and torch.onnx emit become typed constants (the contrib attention ops' outputs
   are typed first, as onnx cannot infer them), and Reshape'd axes and other small constant
   sub-graphs become constants the rules below can read; then clean-up rules (CLEANUP_RULES,
   mostly onnxscript's: Mul by 1, whole-axis Slices, no-op Casts, Transpose and Reshape
   pairs and round trips) until nothing changes;
3. normalizations, by pattern (onnxscript rewriter rules, any model):
   - RMSNorm, ``scale * (x / sqrt(mean(x^2, -1) + eps))`` in its exported forms (Pow or
     x*x; Sqrt then Reciprocal and Mul, or Div; a Cast to float around the normalization)
     -> ``RMSNormalization`` (opset 23), both targets;
   - target "ort": a residual Add feeding an RMSNormalization ->
     ``com.microsoft.SkipSimplifiedLayerNormalization`` (its output 3 is the sum, which the
     residual stream reads on), and the same for ``LayerNormalization`` ->
     ``com.microsoft.SkipLayerNormalization``;
4. RoPE (codegen/onnx/rotary.py): rotate-half chains -> ``RotaryEmbedding`` (opset 23), on
   the projection's [B, S, H*D] output, so that the head split's Transposes cancel against
   the contrib ops' packing (the clean-up runs again);
5. target "ort" (codegen/onnx/gqa_fold.py): the rotary into GroupQueryAttention
   (``do_rotary``); then q/k/v that one GroupQueryAttention reads become one packed
   projection (codegen/onnx/packing.py) that the op takes as its packed-QKV input. Nothing
   else is packed: where a Split would cut the packed output apart, it cost more than the
   one MatMul saved (PACKING).

Why RMSNormalization and not ONNX Runtime's ``SimplifiedLayerNormalization`` for a norm
without a residual Add on "ort": ORT registers SimplifiedLayerNormalization in the *onnx*
domain (a contrib op there), which onnx.checker rejects ("No Op registered ... domain_version
of 23"), and it is not registered under com.microsoft; ORT (>= 1.23) runs the standard
RMSNormalization with its own kernel (the same LayerNorm kernel, simplified), as fast in a
measurement here. ``ort_runs_rms_normalization()`` gates the RMSNorm lowering: where the
installed ONNX Runtime cannot run it, the chain is left as it is.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
)
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as cleanup

from rewriter.codegen.onnx.gqa_fold import fold_packed_qkv, fold_rotary, group_query_qkv
from rewriter.codegen.onnx.packing import pack_projections
from rewriter.codegen.onnx.rotary import lower_rope
from rewriter.codegen.onnx.sizes import sizes_from_graph_inputs

MSFT = "com.microsoft"
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                     ir.DataType.DOUBLE})
_COMPUTE = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})  # stash_type of the fused ops
# the input types ORT's CPU Skip*LayerNormalization kernels take
_SKIP_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
FOLD_INPUT_LIMIT = 8192  # elements: constants up to this size are folded (onnxscript's default)
# elements a folded value may have: scalars, axes and shapes fold; position tables and masks
# (S or S x S elements, computed in-graph on purpose) do not become initializers
FOLD_OUTPUT_LIMIT = 64


# Which same-input projections each target packs (packing.pack_projections' ``choose``; None:
# none). "ort": only the q/k/v that GroupQueryAttention takes packed. A packed projection that
# a Split cuts back apart lost in every measurement here (SmolLM2-135M decoder, 2 threads):
# gate/up packed on "ort", prefill 2048 7343 ms vs 6959 ms without (ORT's Split copies
# [S, 2 x 1536] a layer), and at a decode step the 30 Splits took 0.78 ms of 51 in ORT's
# profile while the MatMuls took the same time packed or not; q/k/v and gate/up packed on
# "onnx" (whose Attention op takes q/k/v apart), prefill 2048 10016 ms vs 8889 ms, decode
# after 512 42.7 vs 42.8 ms.
PACKING = {"onnx": None, "ort": group_query_qkv}


def lower(model: ir.Model, target: str) -> dict[str, int]:
    """Fold constants and fuse normalizations in ``model`` (in place) for ``target``
    ("onnx" or "ort"); returns how many times each rule fired (an RMSNormalization that a
    Skip rule then took counts under both)."""
    _type_attention_outputs(model)
    moved = sizes_from_graph_inputs(model)
    fold_constants(model, should_fold=_small_inputs_only, onnx_shape_inference=True,
                   output_size_limit=FOLD_OUTPUT_LIMIT)
    counts = {"SizeFromGraphInput": moved, "cleanup": _clean_up(model), "RMSNormalization": 0,
              "SkipSimplifiedLayerNormalization": 0, "SkipLayerNormalization": 0}
    if ort_runs_rms_normalization():
        counts["RMSNormalization"] = RMS_NORM_RULES.apply_to_model(model)
    if target == "ort":
        counts["SkipSimplifiedLayerNormalization"] = SKIP_RMS_NORM_RULES.apply_to_model(model)
        counts["SkipLayerNormalization"] = SKIP_LAYER_NORM_RULES.apply_to_model(model)
    counts["RotaryEmbedding"] = lower_rope(model)
    if counts["RotaryEmbedding"]:  # one cos/sin half-table per model instead of per tensor;
        CommonSubexpressionEliminationPass()(model)  # the head split's Transpose now meets
        counts["cleanup"] += _clean_up(model)  # the packing one
    if target == "ort":
        counts["GroupQueryAttention.do_rotary"] = fold_rotary(model)
    counts["PackedMatMul"] = pack_projections(model, PACKING[target]) if PACKING[target] else 0
    if target == "ort":
        counts["GroupQueryAttention.packed_qkv"] = fold_packed_qkv(model)
    if any(counts.values()):
        # the rules leave Identity nodes and one small Constant per match
        IdentityEliminationPass()(model)
        CommonSubexpressionEliminationPass()(model)
        RemoveUnusedNodesPass()(model)
    if counts["SkipSimplifiedLayerNormalization"] or counts["SkipLayerNormalization"]:
        model.opset_imports.setdefault(MSFT, 1)
        _drop_unread_outputs(model, {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"})
    return counts


def _drop_unread_outputs(model: ir.Model, op_types: set[str]) -> None:
    """Unname the optional outputs nothing reads of ``op_types`` nodes (ONNX: an empty name
    is an absent output), so that ONNX Runtime neither allocates nor writes them: the Skip
    norms' mean and inverse deviation, and the last norm's unread residual sum."""
    outputs = set(model.graph.outputs)
    for node in model.graph:
        if node.op_type in op_types:
            for value in node.outputs[1:]:
                if not value.uses() and value not in outputs:
                    value.name = ""


class SameShapeReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x, shape)`` whose output shape equals x's, dimension by dimension (static
    sizes or the same symbolic names, which torch.export proved equal) -> x: the no-op views
    between the head split and merge hide Transpose pairs from the clean-up."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y, **_):
        return _known_same_shape(x, y)

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def _known_same_shape(x: ir.Value, y: ir.Value) -> pattern.MatchResult:
    """y's shape equals x's, every dimension static or a named symbol."""
    result = pattern.MatchResult()
    if not (_same_dims(x.shape, y.shape) and all(
            isinstance(d, int) or d.value is not None for d in x.shape)):
        return result.fail("the output shape is not known to equal the input's", y)
    return result


class ReshapeRoundTrip(pattern.RewriteRuleClassBase):
    """``Reshape(Reshape(x, a), b)`` back to x's own shape (known dims, as SameShapeReshape)
    -> x: the head split [B, S, H, D] and the contrib ops' packing [B, S, H*D] once the
    Transposes between them are gone."""

    def pattern(self, op, x, a, b):
        return op.Reshape(op.Reshape(x, a, _allow_other_attributes=True), b,
                          _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y, **_):
        return _known_same_shape(x, y)

    def rewrite(self, op, x, **_):
        return op.Identity(x)


# onnxscript's general clean-up rules that our exports need: the rope scaling Mul by 1.0 would
# hide the RoPE chains from the rotary rules; whole-axis Slices, Transpose and Reshape pairs and
# no-op Casts/Expands cost a node each in every layer
CLEANUP_RULES = pattern.RewriteRuleSet([
    cleanup.mul_by_1_rule, cleanup.div_by_1_rule, cleanup.add_0_rule, cleanup.sub_0_rule,
    cleanup.collapse_slice_rule, cleanup.collapse_slice2_rule, cleanup.no_op_cast_rule,
    cleanup.cast_cast_rule, cleanup.no_op_expand_rule, cleanup.no_op_transpose_rule,
    cleanup.transpose_transpose_rule, cleanup.reshape_reshape_rule,
    cleanup.unsqueeze_unsqueeze_rule, SameShapeReshape.rule("SameShapeReshape"),
    ReshapeRoundTrip.rule("ReshapeRoundTrip", remove_nodes=False)])


def _clean_up(model: ir.Model, rounds: int = 4) -> int:
    """CLEANUP_RULES until nothing changes (one sweep can expose another pair; the Identity
    nodes the rules leave would hide the next pair)."""
    total = 0
    for _ in range(rounds):
        count = CLEANUP_RULES.apply_to_model(model)
        IdentityEliminationPass()(model)
        total += count
        if not count:
            break
    return total


# contrib attention ops: every output has the query's type (onnx has no schema to infer it)
_TYPED_LIKE_QUERY = frozenset({"GroupQueryAttention", "MultiHeadAttention"})
# ops whose output has their first input's type (walked back to find the query's type)
_SAME_TYPE = frozenset({"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Expand",
                        "Slice", "Concat", "Gather"})


def _type_attention_outputs(model: ir.Model) -> None:
    """Give the outputs of the contrib attention ops the query's type where the exporter
    left them untyped, so that the constant folder (with onnx's shape inference after it)
    can type what reads them, such as the CastLike(0, y) of masks.zero_nan."""
    for node in model.graph:
        if node.domain != MSFT or node.op_type not in _TYPED_LIKE_QUERY:
            continue
        value = node.inputs[0]
        while value is not None and value.dtype is None and value.producer() is not None \
                and value.producer().op_type in _SAME_TYPE:
            value = value.producer().inputs[0]
        if value is None or value.dtype is None:
            continue
        for out in node.outputs:
            if out.dtype is None:
                out.dtype = value.dtype


def _small_inputs_only(node: ir.Node) -> bool | None:
    """Leave nodes reading a weight-sized constant to ONNX Runtime: the folder would
    otherwise transpose every MatMul weight into a second copy (export memory x2)."""
    if any(v is not None and v.const_value is not None
           and v.const_value.size > FOLD_INPUT_LIMIT for v in node.inputs):
        return False
    return None


@functools.cache
def ort_runs_rms_normalization() -> bool:
    """Whether the installed ONNX Runtime runs RMSNormalization (opset 23; ORT >= 1.23). True
    where ONNX Runtime is not installed: the op is standard ONNX."""
    try:
        import onnxruntime as ort
    except ImportError:
        return True
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 1.0])
    graph = helper.make_graph([helper.make_node("RMSNormalization", ["x", "s"], ["y"])],
                              "probe", [x], [y], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own NOT_IMPLEMENTED / INVALID_GRAPH types
        return False
    return True


# --- value helpers ---------------------------------------------------------------------------

def _const(value: ir.Value | None) -> np.ndarray | None:
    """The constant ``value`` holds (an initializer or a Constant node's output), or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    return None if array is None or array.size != 1 else float(array.reshape(()))


def _is_last_axis(axes: ir.Value | None, x: ir.Value) -> bool:
    """``axes`` (ReduceMean's input) is the one last axis of ``x``: -1, or rank - 1."""
    array = _const(axes)
    if array is None or array.size != 1:
        return False
    axis = int(array.reshape(()))
    return axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)


def _same_dims(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        str(p) == str(q) for p, q in zip(a, b, strict=True))


def _is_channel_vector(w: ir.Value, x: ir.Value) -> bool:
    """``w`` has shape [D] where D is the last dimension of ``x`` (a per-channel weight)."""
    return (w.shape is not None and x.shape is not None and len(w.shape) == 1
            and len(x.shape) >= 1 and str(w.shape[0]) == str(x.shape[-1]))


# --- RMSNorm -> RMSNormalization -------------------------------------------------------------

class RMSNormFusion(pattern.RewriteRuleClassBase):
    """``scale * (x * 1/sqrt(mean(x^2, axis=-1, keepdims) + eps))`` -> RMSNormalization(x,
    scale, axis=-1, epsilon=eps, stash_type): x optionally Cast to a float compute type first
    and the normalized value Cast back (Hugging Face's RMSNorm in float16/bfloat16)."""

    def __init__(self, name: str, scale_first: bool, div: bool):
        super().__init__(name)
        self.scale_first, self.div = scale_first, div

    def pattern(self, op, x, exponent, axes, eps, scale, compute, target):
        xc = pattern.OrValue([op.Cast(x, to=compute), x], tag_var="cast_in",
                             tag_values=[True, False])
        square = pattern.OrValue([op.Pow(xc, exponent), op.Mul(xc, xc)])
        mean = op.ReduceMean(square, axes, _outputs=["mean"])
        std = op.Sqrt(pattern.OrValue([op.Add(mean, eps), op.Add(eps, mean)]))
        if self.div:
            normed = op.Div(xc, std)
        else:
            normed = pattern.OrValue([op.Mul(xc, op.Reciprocal(std)),
                                      op.Mul(op.Reciprocal(std), xc)])
        normed = pattern.OrValue([op.Cast(normed, to=target), normed], tag_var="cast_out",
                                 tag_values=[True, False])
        return op.Mul(scale, normed) if self.scale_first else op.Mul(normed, scale)

    def check(self, context, x, exponent, axes, eps, scale, compute, mean, cast_in, **_):
        result = pattern.MatchResult()
        if exponent is not None and _scalar(exponent) != 2.0:
            return result.fail("the power is not 2", exponent)
        if not _is_last_axis(axes, x):
            return result.fail("the mean is not over the last axis alone", axes)
        node = mean.producer()
        if node.attributes.get_int("keepdims", 1) != 1:
            return result.fail("the mean does not keep its axis", node)
        epsilon = _scalar(eps)
        if epsilon is None or epsilon < 0 or not np.isfinite(epsilon):
            return result.fail("epsilon is not a non-negative constant scalar", eps)
        self._epsilon = epsilon
        stash = ir.DataType(compute.as_int()) if cast_in else x.dtype
        if stash not in _COMPUTE:
            return result.fail(f"normalization computed in {stash}, not float or double")
        self._stash = stash
        # one type throughout (ORT registers same-type kernels), a per-channel scale
        out = context.root.outputs[0]
        if not (x.dtype in _FLOATS and x.dtype == scale.dtype == out.dtype):
            return result.fail("input, scale and output types differ", x)
        if not _is_channel_vector(scale, x):
            return result.fail("the scale is not a vector over the last axis", scale)
        return result

    def rewrite(self, op, x, scale, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=self._epsilon,
                                   stash_type=self._stash.value)


RMS_NORM_RULES = pattern.RewriteRuleSet([
    RMSNormFusion.rule(f"RMSNorm{'Div' if div else ''}{'ScaleFirst' if first else ''}",
                       scale_first=first, div=div)
    for first in (True, False) for div in (False, True)])


# --- target "ort": residual Add + norm -> Skip*LayerNormalization ----------------------------

class _SkipFusion(pattern.RewriteRuleClassBase):
    """``norm(Add(a, b))`` -> the com.microsoft Skip* op, whose output 3 (a + b) replaces the
    Add for the residual stream. a and b: the same [B, S, D] shape; float32 or float16."""

    def check(self, context, a, b, gamma, y, **_):
        result = pattern.MatchResult()
        if not (a.shape is not None and len(a.shape) == 3 and _same_dims(a.shape, b.shape)):
            return result.fail("the Add's inputs are not two [B, S, D] tensors", a)
        if not (a.dtype in _SKIP_TYPES and a.dtype == b.dtype == gamma.dtype):
            return result.fail("types the Skip kernels do not take", a)
        if not _is_channel_vector(gamma, a):
            return result.fail("the scale is not a vector over the last axis", gamma)
        node = y.producer()
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("not normalized over the last axis", node)
        if node.attributes.get_int("stash_type", 1) != ir.DataType.FLOAT.value:
            return result.fail("not computed in float", node)
        return result


class SkipRMSNormFusion(_SkipFusion):
    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b, _outputs=["total"])
        return op.RMSNormalization(total, gamma, _allow_other_attributes=True,
                                   _outputs=["y"]), total

    def rewrite(self, op, a, b, gamma, y, **_):
        epsilon = y.producer().attributes.get_float("epsilon", 1e-5)
        out, _, _, total = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, epsilon=epsilon, _outputs=4, _domain=MSFT)
        return out, total


class SkipLayerNormFusion(_SkipFusion):
    def pattern(self, op, a, b, gamma, beta):
        total = op.Add(a, b, _outputs=["total"])
        return op.LayerNormalization(total, gamma, beta, _allow_other_attributes=True,
                                     _outputs=["y"]), total

    def check(self, context, a, b, gamma, y, beta=None, **_):
        result = super().check(context, a, b, gamma, y)
        if result and not (beta is not None and _is_channel_vector(beta, a)
                           and beta.dtype == a.dtype):
            return result.fail("the bias is not a vector over the last axis", beta)
        return result

    def rewrite(self, op, a, b, gamma, beta, y, **_):
        epsilon = y.producer().attributes.get_float("epsilon", 1e-5)
        out, _, _, total = op.SkipLayerNormalization(
            a, b, gamma, beta, epsilon=epsilon, _outputs=4, _domain=MSFT)
        return out, total


SKIP_RMS_NORM_RULES = pattern.RewriteRuleSet([SkipRMSNormFusion.rule("SkipRMSNorm")])
SKIP_LAYER_NORM_RULES = pattern.RewriteRuleSet([SkipLayerNormFusion.rule("SkipLayerNorm")])
