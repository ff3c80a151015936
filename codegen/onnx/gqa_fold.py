"""Folds into ``com.microsoft.GroupQueryAttention`` for target "ort" (issue #18): the rotary op on
q and k becomes the op's own rotary (``do_rotary`` with cos/sin caches), and q/k/v that are the
three parts of one packed projection become its packed-QKV input.

Shape glossary: q [B, S, H*D], k/v [B, S, Hkv*D] (the contrib layout), P = past length,
T = P + S = total_sequence_length, table [1, S, D/2] (cos or sin for the S new tokens, one row
for every batch row).

**Rotary.** With ``do_rotary=1`` the kernel rotates token s of every row by row P + s of its
cos/sin caches [max positions, D/2] (P from seqlens_k + 1 - S, and seqlens_k = T - 1 in every
row of our exports: translate._group_query). So the caches are the model's own table put at
rows P..P+S-1: ``Pad(table[0], [P, 0])`` [T, D/2], whatever positions the model computed.
That needs one table for all rows (batch 1): a padded decoder's per-row positions are left
to the RotaryEmbedding op.

**Packed QKV.** ``Split(x, [H*D, Hkv*D, Hkv*D], axis=-1)`` feeding query, key and value in
that order -> query = x, key and value absent (the kernel splits).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.codegen.onnx.rotary import SHAPE_RULES

MSFT = "com.microsoft"
# ONNX Runtime's GroupQueryAttention refuses do_rotary otherwise ("head_size shall be a
# multiple of 16"); such heads keep the RotaryEmbedding op
ROTARY_HEAD_MULTIPLE = 16


def _absent(node: ir.Node, *indices: int) -> bool:
    return all(i >= len(node.inputs) or node.inputs[i] is None for i in indices)


def shared_table(table: ir.Value) -> ir.Value | None:
    """The [1, S, R/2] table that ``table`` (a RotaryEmbedding cos/sin input [B, S, R/2])
    broadcasts over the batch, or None when rows may differ."""
    node = table.producer()
    if node is not None and node.op_type == "Expand":
        table = node.inputs[0]
    return table if table.shape is not None and len(table.shape) == 3 \
        and table.shape[0] == 1 else None


class RotaryIntoGroupQueryAttention(pattern.RewriteRuleClassBase):
    """GroupQueryAttention(RotaryEmbedding(q), RotaryEmbedding(k), v, ...) ->
    GroupQueryAttention(q, k, v, ..., cos_cache, sin_cache, do_rotary=1)."""

    def pattern(self, op, q, k, v, cos, sin):
        q_rope = op.RotaryEmbedding(q, cos, sin, _allow_other_attributes=True,
                                    _outputs=["q_rope"])
        k_rope = op.RotaryEmbedding(k, cos, sin, _allow_other_attributes=True,
                                    _outputs=["k_rope"])
        # the rest (past, seqlens_k, total, bias) may be absent: read off the node
        return op.GroupQueryAttention(q_rope, k_rope, v, _domain=MSFT, _allow_other_inputs=True,
                                      _allow_other_attributes=True,
                                      _outputs=["out", "present_key", "present_value"])

    def check(self, context, q, k, cos, sin, q_rope, k_rope, out, **_):
        result = pattern.MatchResult()
        attn = out.producer()
        if attn.attributes.get_int("do_rotary", 0) or not _absent(attn, 7, 8, 9):
            return result.fail("the attention already has rotary inputs", attn)
        for value, heads in ((q, attn.attributes.get_int("num_heads")),
                             (k, attn.attributes.get_int("kv_num_heads"))):
            if value.shape is None or len(value.shape) != 3:
                return result.fail("q/k are not [B, S, H*D]", value)
            rope = (q_rope if value is q else k_rope).producer()
            if rope.attributes.get_int("interleaved", 0) \
                    or rope.attributes.get_int("num_heads") != heads:
                return result.fail("an interleaved rotary, or another head count", rope)
            if "rotary_embedding_dim" in rope.attributes:
                return result.fail("partial rotary: left to the RotaryEmbedding op", rope)
            width = value.shape[2]
            if not isinstance(width, int) or not heads or width % heads \
                    or (width // heads) % ROTARY_HEAD_MULTIPLE:
                return result.fail(f"head size {width}/{heads}: ONNX Runtime's rotary inside "
                                   f"GroupQueryAttention takes multiples of "
                                   f"{ROTARY_HEAD_MULTIPLE}", value)
        tables = [shared_table(t) for t in (cos, sin)]
        if None in tables:
            return result.fail("cos/sin differ between batch rows (per-row positions)", cos)
        self._tables = tables
        return result

    def rewrite(self, op, q, k, v, out, **_):
        attn = out.producer()
        past_key, past_value, seqlens, total = attn.inputs[3:7]
        # rows 0..P-1 are never read: P = T - S, S read off the table (which every layer
        # shares, so that CSE leaves one pair of caches per model, not one per layer)
        past = op.Sub(op.Cast(total, to=ir.DataType.INT64),
                      op.Shape(self._tables[0], start=1, end=2))
        pads = op.Concat(op.Reshape(past, op.Constant(value_ints=[1])),
                         op.Constant(value_ints=[0, 0, 0]), axis=0)
        cos_cache, sin_cache = (
            op.Pad(op.Squeeze(t, op.Constant(value_ints=[0])), pads) for t in self._tables)
        bias = attn.inputs[10] if len(attn.inputs) > 10 else None
        attrs = {name: a.value for name, a in attn.attributes.items()}
        return op.GroupQueryAttention(
            q, k, v, past_key, past_value, seqlens, total, cos_cache, sin_cache, None, bias,
            **{**attrs, "do_rotary": 1, "rotary_interleaved": 0}, _domain=MSFT, _outputs=3)


class PackedQKVIntoGroupQueryAttention(pattern.RewriteRuleClassBase):
    """GroupQueryAttention(*Split(x, [H*D, Hkv*D, Hkv*D], axis=-1), ...) ->
    GroupQueryAttention(x, None, None, ...)."""

    def pattern(self, op, x, sizes):
        q, k, v = op.Split(x, sizes, _allow_other_attributes=True, _outputs=["q", "k", "v"])
        return op.GroupQueryAttention(q, k, v, _domain=MSFT, _allow_other_inputs=True,
                                      _allow_other_attributes=True,
                                      _outputs=["out", "present_key", "present_value"])

    def check(self, context, x, sizes, q, k, v, out, **_):
        result = pattern.MatchResult()
        split = q.producer()
        rank = None if q.shape is None else len(q.shape)  # the Split's input may be untyped
        if rank != 3 or split.attributes.get_int("axis", 0) not in (-1, 2):
            return result.fail("not a split of [B, S, .] on the last axis", split)
        tensor = ir.convenience.get_const_tensor(sizes)
        attn = out.producer()
        heads, kv_heads = (attn.attributes.get_int(a) for a in ("num_heads", "kv_num_heads"))
        if tensor is None or heads is None or kv_heads is None:
            return result.fail("unknown split sizes or head counts", split)
        n = [int(s) for s in tensor.numpy().reshape(-1)]
        d = n[0] // heads if heads else 0
        if n != [heads * d, kv_heads * d, kv_heads * d]:
            return result.fail(f"split sizes {n} are not [H*D, Hkv*D, Hkv*D]", split)
        return result

    def rewrite(self, op, x, out, **_):
        attn = out.producer()
        attrs = {name: a.value for name, a in attn.attributes.items()}
        return op.GroupQueryAttention(x, None, None, *attn.inputs[3:], **attrs, _domain=MSFT,
                                      _outputs=3)


class ShapeOfSplitPart(pattern.RewriteRuleClassBase):
    """``Shape(Split(x, axis=-1)[i], start, end)`` with end before the last axis ->
    ``Shape(x, start, end)``: the batch and sequence sizes read off q/k, which would keep the
    Split alive once GroupQueryAttention takes the packed projection."""

    def pattern(self, op, part):
        return op.Shape(part, _allow_other_attributes=True, _outputs=["size"])

    def check(self, context, part, size, **_):
        result = pattern.MatchResult()
        split = part.producer()
        if split is None or split.op_type != "Split" or part.shape is None:
            return result.fail("not a part of a Split", part)
        rank = len(part.shape)
        end = size.producer().attributes.get_int("end")
        if split.attributes.get_int("axis", 0) not in (-1, rank - 1) or end is None \
                or not 0 <= end < rank:
            return result.fail("the sizes read include the split axis", size)
        return result

    def rewrite(self, op, part, size, **_):
        attrs = {k: v.value for k, v in size.producer().attributes.items()}
        return op.Shape(part.producer().inputs[0], **attrs)


# remove_nodes=False: the ropes' tables and the Split may have other readers; what is left
# unused goes with lean's RemoveUnusedNodesPass
ROTARY_RULES = pattern.RewriteRuleSet([
    RotaryIntoGroupQueryAttention.rule("RotaryIntoGroupQueryAttention", remove_nodes=False)])
PACKED_RULES = pattern.RewriteRuleSet([
    PackedQKVIntoGroupQueryAttention.rule("PackedQKVIntoGroupQueryAttention",
                                          remove_nodes=False)])
SPLIT_SHAPE_RULES = pattern.RewriteRuleSet([ShapeOfSplitPart.rule("ShapeOfSplitPart")])


def fold_rotary(model: ir.Model) -> int:
    """The rotary fold on ``model`` (in place); returns how many sites took it."""
    rotary = ROTARY_RULES.apply_to_model(model)
    if rotary:  # the sizes read off the rotations, which would keep them alive
        SHAPE_RULES.apply_to_model(model)
    return rotary


def group_query_qkv(matmuls: list[ir.Node]) -> list[ir.Node] | None:
    """For packing.pack_projections: the three projections of ``matmuls`` that are the
    query, key and value of one GroupQueryAttention, in that order, or None. Only these
    pack: the op takes them packed, so no Split is left (elsewhere the Split's copies cost
    more than the one MatMul saves: measurements in lean.py)."""
    slots: dict[ir.Node, dict[int, ir.Node]] = {}
    for matmul in matmuls:
        uses = list(matmul.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "GroupQueryAttention" \
                or uses[0].idx > 2:
            continue
        slots.setdefault(uses[0].node, {})[uses[0].idx] = matmul
    for found in slots.values():
        if len(found) == 3:
            return [found[i] for i in range(3)]
    return None


def fold_packed_qkv(model: ir.Model) -> int:
    """The packed-QKV fold on ``model`` (in place, after packing.pack_projections); returns
    how many sites took it."""
    packed = PACKED_RULES.apply_to_model(model)
    if packed:
        SPLIT_SHAPE_RULES.apply_to_model(model)
    return packed
