"""Translation of ``rewriter::attention`` into ONNX, one op choice per site.

Shape glossary (as in rewriter.ir.ops): q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv],
out [B, Hq, Sq, Dv]; G = Hq // Hkv query heads per KV head. In a decoder
(``rewriter::cached_attention``), k/v hold the S new tokens, past_key/past_value [B, Hkv, P, D]
the cache, and the outputs add present_key/present_value [B, Hkv, P+S, D].

Ops, by target:
    onnx  Attention (opset 23): GQA, softcap, causal and masks are native; the sparsity mask is
          built in-graph and ANDed into attn_mask. "decomposed" (MatMul/Softmax/MatMul, GQA by
          reshaping q to [B, Hkv, G*Sq, D], no repeat) when asked for.
    ort   com.microsoft.GroupQueryAttention for causal self-attention (GQA native, softcap,
          local_window_size for a plain window, other masks as attention_bias);
          com.microsoft.MultiHeadAttention for the rest when Hq == Hkv and there is no softcap;
          the standard Attention op otherwise.
    both  "banded" (banded.py, standard ops) for causal self-attention with a static sink +
          window MaskSpec (one window, or one per head without full heads; a table mixing
          full and windowed KV heads is split, the full part on GroupQueryAttention or
          Attention) unless "decomposed" is asked for: only the keys a block of queries may
          read are gathered, no S x S mask or scores. Also
          for a plain window on "ort": GroupQueryAttention's local_window_size was slower on
          ONNX Runtime's CPU kernel, which still computes the causal scores (banded.py).

Decoder sites (cached_attention): "onnx" uses Attention's own past_key/past_value inputs with a
bottom-right causal mask ("decomposed": Concat, then MatMul/Softmax/MatMul); "ort" uses
GroupQueryAttention's past_key/past_value (BNSH), seqlens_k = P + S - 1.

Bounded decoder sites (``rewriter::bounded_cached_attention``: a sink + window cache of L <= bound
entries after P = past_length tokens): both targets Concat(past, new) and attend with a bool mask
built from the positions (causal and the MaskSpec on positions, MaskSpec.keep_at) by the
standard Attention op ("decomposed" when asked), then evict: present = the first sink entries
and the last bound - sink by two Slices (the whole Concat while L + S <= bound).
GroupQueryAttention is not used: its local_window_size has no sinks, and it takes the cache to
hold positions 0..L-1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset23 as op

from rewriter.codegen.onnx import banded as band
from rewriter.codegen.onnx import contrib
from rewriter.codegen.onnx.masks import (
    bias,
    cache_positions,
    causal_keep,
    causal_keep_bottom_right,
    const,
    dim,
    keep_at,
    merge,
    positions,
    sparsity_keep,
    to_4d,
    zero_nan,
)
from rewriter.codegen.onnx.topk import topk_keep
from rewriter.ir.masks import MaskSpec
from rewriter.ir.ops import attention as _registers_ops  # noqa: F401  (torch.ops.rewriter.*)
from rewriter.ir.padding import padded_cached_attention as _registers_padded  # noqa: F401
from rewriter.ir.topk import TopKSpec, parse_sparsity

ATTENTION = torch.ops.rewriter.attention.default
CACHED = torch.ops.rewriter.cached_attention.default
BOUNDED = torch.ops.rewriter.bounded_cached_attention.default
PADDED = torch.ops.rewriter.padded_cached_attention.default  # rewriter.ir.padding
POSITIONS = torch.ops.rewriter.padding_positions.default
STANDARD, DECOMPOSED, GQA, MHA = "Attention", "decomposed", "GroupQueryAttention", \
    "MultiHeadAttention"
SPLIT_GQA, SPLIT_STANDARD = "split: GroupQueryAttention + banded", "split: Attention + banded"
BANDED = "banded"  # codegen/onnx/banded.py: standard ops, O(S * (sink + W + Bq)) work


@dataclass
class SitePlan:
    """The ONNX op one canonical node becomes, and why (the export manifest's row)."""

    site: int | None
    node: str
    op: str
    reason: str
    cached: bool = False  # a decoder site reading and writing a KV cache
    rereads: bool = False  # its K or V cache entry is also read by an earlier site (share-kv)
    bound: int | None = None  # a bounded (sink + window) cache site: the positions it keeps

    def to_dict(self) -> dict:
        domain = "com.microsoft" if self.op in (GQA, MHA, SPLIT_GQA) else ""
        row = {"site": self.site, "node": self.node, "op": self.op, "domain": domain,
               "reason": self.reason}
        if self.bound is not None:
            row["bound"] = self.bound
        return {**row, "kv_cache": True} if self.cached else row


def plan(module, sites: dict, target: str, decompose: bool = False) -> list[SitePlan]:
    """One SitePlan per canonical node of ``module`` (``sites``: node name -> AttentionSite),
    in graph order (the order torch.onnx translates them)."""
    plans, read = [], set()
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in (ATTENTION, CACHED, BOUNDED,
                                                             PADDED):
            continue
        site = sites.get(node.name)
        cached = node.target in (CACHED, BOUNDED, PADDED)
        bound = node.kwargs["bound"] if node.target is BOUNDED else None
        choice = choose_bounded if bound is not None else choose_cached if cached else choose
        op_name, reason = choice(node, site, target, decompose)
        rereads = cached and bool(read & set(node.args[3:5]))
        if cached:
            read.update(node.args[3:5])
        plans.append(SitePlan(None if site is None else site.index, node.name, op_name, reason,
                              cached, rereads, bound))
    return plans


def choose(node, site, target: str, decompose: bool) -> tuple[str, str]:
    q, k, v = (a.meta["val"] for a in node.args[:3])
    attrs = node.kwargs
    hq, hkv = q.shape[1], k.shape[1]
    if attrs.get("alibi"):
        return _alibi_choice(decompose, hq, hkv)
    banded = None if decompose else _banded_choice(node, site)
    if banded is not None:
        return BANDED, banded
    split = None if decompose else _split_choice(node, site, target)
    if split is not None:
        return split
    if target == "onnx":
        return _standard_choice(decompose, hq, hkv)
    same_len = str(q.shape[2]) == str(k.shape[2])
    causal = _causal(node, site)
    fallback = STANDARD if not decompose else DECOMPOSED
    if q.shape[-1] != v.shape[-1]:
        return fallback, "D != Dv: the contrib ops take one head size"
    if causal and same_len:
        return GQA, _gqa_reason("causal self-attention", hq, hkv, attrs)
    if hq != hkv:
        return fallback, "GroupQueryAttention is causal-only and MultiHeadAttention has no " \
                         "KV groups"
    if attrs.get("softcap"):
        return fallback, "MultiHeadAttention has no softcap and the site is not causal " \
                         "self-attention"
    return MHA, ("cross attention" if not same_len or (site is not None and site.cross)
                 else "non-causal self-attention") + f", {hq} heads"


def _causal_self(node, site, mask_heads) -> bool:
    """Causal self-attention (Sq == Sk, is_causal or a causal site mask) whose mask argument,
    if any, broadcasts over `mask_heads` heads: the sites the band and the split can take."""
    q, k = (a.meta["val"] for a in node.args[:2])
    mask = node.args[3] if len(node.args) > 3 else None
    mask_shape = None if mask is None else mask.meta["val"].shape
    return (_causal(node, site) and str(q.shape[2]) == str(k.shape[2])
            and band.mask_fits(mask_shape, mask_heads))


def _causal(node, site) -> bool:
    return bool(node.kwargs.get("is_causal", False)) or (
        site is not None and site.mask.startswith("causal") and not site.cross)


def _split_choice(node, site, target: str) -> tuple[str, str] | None:
    """A causal self-attention site whose per-head table makes whole KV heads full or windowed
    (sparse:heads=auto): the full part on the target's causal op and the windowed part banded
    (each head its own window), instead of every head paying for a dense S x S bias."""
    q, k, v = (a.meta["val"] for a in node.args[:3])
    spec = parse_sparsity(node.kwargs.get("sparsity", ""))
    if not (isinstance(spec, MaskSpec) and _causal_self(node, site, 1)):
        return None
    parts = spec.kv_head_parts(q.shape[1], k.shape[1])
    if parts is None or not all(m.is_dense or band.fits(m, len(qh)) for qh, _, m in parts):
        return None
    full = GQA if target == "ort" and q.shape[-1] == v.shape[-1] else STANDARD
    op_name = SPLIT_GQA if full == GQA else SPLIT_STANDARD
    return op_name, (f"causal self-attention with a per-KV-head table: {len(parts)} parts ("
                     + ", ".join(f"{len(kv)} KV heads {m}" for _, kv, m in parts)
                     + f"), full ones on {full}, windowed ones banded")


def split_heads(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap,
                full_op: Callable):
    """One op per part of whole KV heads (MaskSpec.kv_head_parts), heads taken by Gather on
    axis 1, outputs concatenated and put back in query-head order."""
    outs, order = [], []
    for q_heads, kv_heads, part in spec.kv_head_parts(q.shape[1], k.shape[1]):
        qq = _take_heads(q, q_heads)
        kk, vv = (_take_heads(x, kv_heads) for x in (k, v))
        impl = full_op if part.is_dense else band.banded
        outs.append(impl(qq, kk, vv, attn_mask, scale=scale, is_causal=is_causal, spec=part,
                         softcap=softcap))
        order += q_heads
    y = op.Concat(*outs, axis=1)
    if order != sorted(order):
        y = op.Gather(y, const(sorted(range(len(order)), key=order.__getitem__)), axis=1)
    return y


def _take_heads(x, heads: list[int]):
    """x[:, heads] by Gather, with its shape set (the ops after it read head counts)."""
    y = op.Gather(x, const(heads), axis=1)
    dims = list(x.shape)
    dims[1] = len(heads)
    y.shape = ir.Shape(dims)
    y.dtype = x.dtype  # a shape without a type is dropped from value_info, with a warning
    return y


def _banded_choice(node, site) -> str | None:
    """The reason for `banded.banded` at a causal self-attention site with a static sink +
    window mask, or None. Always chosen for such sites: S is dynamic, and the band was no
    slower than the dense-mask path even at S = 2 (sink + W) (measurements in banded.py)."""
    spec = parse_sparsity(node.kwargs.get("sparsity", ""))
    hq = node.args[0].meta["val"].shape[1]
    if not (band.fits(spec, hq) and _causal_self(node, site, hq)):
        return None
    return (f"causal self-attention with {spec}: {band.BLOCK}-row query blocks each read "
            f"sink + W - 1 + {band.BLOCK} = {band.keys_read(spec, hq)} keys (no S x S mask)")


def choose_cached(node, site, target: str, decompose: bool) -> tuple[str, str]:
    """A decoder site: causal self-attention of S new tokens over a cache of P."""
    del site
    q, k, v = (a.meta["val"] for a in node.args[:3])
    hq, hkv = q.shape[1], k.shape[1]
    if node.kwargs.get("alibi"):
        return _alibi_choice(decompose, hq, hkv, cached=True)
    if target == "onnx":
        return _standard_choice(decompose, hq, hkv, cached=True)
    if q.shape[-1] != v.shape[-1]:
        return (DECOMPOSED if decompose else STANDARD), \
            "D != Dv: the contrib ops take one head size"
    return GQA, _gqa_reason("causal self-attention over the KV cache", hq, hkv, node.kwargs)


def choose_bounded(node, site, target: str, decompose: bool) -> tuple[str, str]:
    """A bounded decoder site (sink + window cache): standard Attention over Concat(past, new)
    with a mask on positions, then eviction, for both targets."""
    del site
    q, k = (a.meta["val"] for a in node.args[:2])
    hq, hkv, bound = q.shape[1], k.shape[1], node.kwargs["bound"]
    gqa = f", GQA {hq}/{hkv} native" if hq != hkv else ""
    if decompose:
        return DECOMPOSED, f"asked for the decomposition; bounded cache ({bound} positions) " \
                           "by Concat and Slice"
    why = "" if target == "onnx" else (
        "; not GroupQueryAttention: its local_window_size has no sinks and it takes the cache "
        "to hold positions 0..L-1")
    return STANDARD, f"standard ONNX Attention (opset 23) over Concat(past, new) with a mask " \
                     f"on positions, bounded cache ({bound} positions) by Slice{gqa}{why}"


def _standard_choice(decompose: bool, hq: int, hkv: int, cached: bool = False
                     ) -> tuple[str, str]:
    if decompose:
        return DECOMPOSED, "asked for the decomposition" + ("; cache by Concat" if cached else "")
    return STANDARD, "standard ONNX Attention (opset 23)" + (
        " with past_key/past_value" if cached else "") + (
        f", GQA {hq}/{hkv} native" if hq != hkv else "")


def _alibi_choice(decompose: bool, hq: int, hkv: int, cached: bool = False
                  ) -> tuple[str, str]:
    """ALiBi sites, both targets: the standard op (or the decomposition) with the bias built
    in-graph, slopes x key position ([1, Hq, 1, Sk], `alibi_mask`). ONNX Runtime's contrib
    attention ops have no per-head linear bias attribute, and the banded path reads no
    per-head additive bias."""
    op_name, why = _standard_choice(decompose, hq, hkv)
    return op_name, f"{why}; ALiBi slopes as an in-graph bias (slopes x key position" + (
        ", over Concat(past, new))" if cached else ")")


def alibi_mask(attn_mask, alibi, q, total, keep=None):
    """The model's mask (bool, float or None) with the ALiBi bias added, and -inf where the
    bool ``keep`` (built in-graph, or None) is False: a float mask [B|1, Hq, Sq|1, Sk] in q's
    dtype; ``total``: the key count (scalar int64). Key j gets alibi[h] * j
    (rewriter.ir.ops.alibi_bias: computed in fp32, then cast)."""
    pos = op.Cast(op.Range(const(0), total, const(1)), to=ir.DataType.FLOAT)
    slopes = const(np.asarray(alibi, dtype=np.float32).reshape(1, -1, 1, 1), np.float32)
    add = op.CastLike(op.Mul(slopes, op.Unsqueeze(pos, const([0, 1, 2]))), q)  # [1, H, 1, Sk]
    neg_inf = op.CastLike(const(float("-inf"), np.float32), q)
    if attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL:
        add = op.Where(to_4d(attn_mask), add, neg_inf)
    elif attn_mask is not None:
        add = op.Add(op.CastLike(to_4d(attn_mask), q), add)
    return add if keep is None else op.Where(keep, add, neg_inf)


def _gqa_reason(what: str, hq: int, hkv: int, attrs: dict) -> str:
    spec = parse_sparsity(attrs.get("sparsity", ""))
    how = "local_window_size" if _plain_window(spec) else \
        "attention_bias" if attrs.get("sparsity") else ""
    return f"{what}, {hq}/{hkv} heads" + (
        f", softcap {attrs['softcap']:g}" if attrs.get("softcap") else "") + (
        f", sparsity via {how}" if how else "")


def _plain_window(spec: MaskSpec | TopKSpec) -> bool:
    return isinstance(spec, MaskSpec) and spec.window is not None and spec.heads is None \
        and spec.sink == 0 and spec.dilation == 1


# --- translations (traced onnxscript: called by torch.onnx once per node) ------------------

def translations(plans: list[SitePlan]) -> dict[object, Callable]:
    """The custom_translation_table entries for both canonical ops; each consumes its
    ``plans`` in graph order."""
    queue = [p for p in plans if not p.cached]
    cached_queue = [p for p in plans if p.cached and p.bound is None]
    bounded_queue = [p for p in plans if p.bound is not None]
    impls = {STANDARD: standard, DECOMPOSED: decomposed, GQA: group_query, MHA: multi_head,
             BANDED: band.banded,
             SPLIT_GQA: functools.partial(split_heads, full_op=group_query),
             SPLIT_STANDARD: functools.partial(split_heads, full_op=standard)}
    cached_impls = {STANDARD: standard_cached, DECOMPOSED: decomposed_cached,
                    GQA: group_query_cached}

    def rewriter_attention(q, k, v, attn_mask=None, *, scale: float, is_causal: bool = False,
                           sparsity: str = "", softcap: float = 0.0, alibi=None):
        if not queue:
            raise RuntimeError("more rewriter::attention nodes than planned sites")
        site = queue.pop(0)
        if alibi:
            attn_mask = alibi_mask(attn_mask, alibi, q, dim(k, 2))
        return impls[site.op](q, k, v, attn_mask, scale=scale, is_causal=is_causal,
                              spec=parse_sparsity(sparsity), softcap=softcap)

    def rewriter_cached_attention(q, k, v, past_key, past_value, *, scale: float,
                                  sparsity: str = "", softcap: float = 0.0, alibi=None):
        if not cached_queue:
            raise RuntimeError("more rewriter::cached_attention nodes than planned sites")
        site = cached_queue.pop(0)
        spec = parse_sparsity(sparsity)
        if alibi:
            return alibi_cached(q, k, v, past_key, past_value, scale=scale, spec=spec,
                                softcap=softcap, alibi=alibi, decompose=site.op == DECOMPOSED)
        # top-k reads all keys, which Attention's own past input keeps inside the op
        concat = site.rereads or isinstance(spec, TopKSpec)
        impl = standard_concat if site.op == STANDARD and concat else cached_impls[site.op]
        return impl(q, k, v, past_key, past_value, scale=scale, spec=spec, softcap=softcap)

    def rewriter_bounded_cached_attention(q, k, v, past_key, past_value, past_length, *,
                                          scale: float, sparsity: str, bound: int,
                                          softcap: float = 0.0):
        if not bounded_queue:
            raise RuntimeError("more rewriter::bounded_cached_attention nodes than planned "
                               "sites")
        site = bounded_queue.pop(0)
        return bounded_cached(q, k, v, past_key, past_value, past_length, scale=scale,
                              spec=MaskSpec.parse(sparsity), bound=bound, softcap=softcap,
                              decompose=site.op == DECOMPOSED)

    def rewriter_padded_cached_attention(q, k, v, past_key, past_value, attention_mask, *,
                                         scale: float, sparsity: str = "",
                                         softcap: float = 0.0, alibi=None):
        if not cached_queue:
            raise RuntimeError("more rewriter::padded_cached_attention nodes than planned "
                               "sites")
        site = cached_queue.pop(0)
        return padded_cached(q, k, v, past_key, past_value, attention_mask, site=site,
                             scale=scale, spec=parse_sparsity(sparsity), softcap=softcap,
                             alibi=alibi)

    return {ATTENTION: rewriter_attention, CACHED: rewriter_cached_attention,
            BOUNDED: rewriter_bounded_cached_attention, PADDED: rewriter_padded_cached_attention,
            POSITIONS: padding_positions}


def keep_mask(spec: MaskSpec | TopKSpec, q, k, sk=None, kv_heads: int | None = None):
    """The sparsity keep-mask: [1, Hs, Sq, Sk] for a static MaskSpec, [B, Hq, Sq, Sk] for
    top-k (which reads every key: ``k`` must then hold them all)."""
    if isinstance(spec, TopKSpec):
        return topk_keep(spec, q, k, q.shape[1], kv_heads or k.shape[1], q.shape[3])
    return sparsity_keep(spec, q, k, sk)


def standard(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap):
    """ONNX Attention (opset 23): 4-D inputs, GQA by head counts, top-left is_causal, softcap
    before the mask; a row with no key left gives zeros (as in ORT's CPU kernel)."""
    keep = None if spec.is_dense else keep_mask(spec, q, k)
    mask = merge(attn_mask, keep)
    y, *_ = op.Attention(q, k, v, None if mask is None else to_4d(mask), scale=scale,
                         is_causal=int(is_causal), softcap=softcap)
    return y


def decomposed(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap, keep=None,
               kv_heads: int | None = None):
    """MatMul / Softmax / MatMul. GQA without repeating K/V: q [B, Hq, Sq, D] is viewed as
    [B, Hkv, G*Sq, D] (head h = kv * G + g), so both MatMuls have matching batch dims.
    ``keep``: an extra bool keep-mask; ``kv_heads`` when k is built in-graph (no shape)."""
    hq, hkv = q.shape[1], kv_heads or k.shape[1]
    grouped = hq != hkv
    qs = op.Mul(q, op.CastLike(const(scale, np.float32), q))  # scale on q: Sq*D, not Sq*Sk
    if grouped:
        qs = op.Reshape(qs, const([0, hkv, -1, 0]))
    s = op.MatMul(qs, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B, Hkv, G*Sq, Sk]
    if grouped:
        s = op.Reshape(s, const([0, hq, -1, 0]))  # [B, Hq, Sq, Sk]
    if softcap > 0:
        cap = op.CastLike(const(softcap, np.float32), s)
        s = op.Mul(op.Tanh(op.Div(s, cap)), cap)
    if is_causal:
        causal = causal_keep(q, k)
        keep = causal if keep is None else op.And(keep, causal)
    if not spec.is_dense:
        sparse = keep_mask(spec, q, k, kv_heads=hkv)
        keep = sparse if keep is None else op.And(keep, sparse)
    masked = attn_mask is not None or keep is not None
    if masked:
        s = op.Add(s, bias(attn_mask, keep, s))
    p = op.Softmax(s, axis=-1)
    if masked:
        p = zero_nan(p)
    if grouped:
        p = op.Reshape(p, const([0, hkv, -1, 0]))  # [B, Hkv, G*Sq, Sk]
    out = op.MatMul(p, v)
    return op.Reshape(out, const([0, hq, -1, 0])) if grouped else out


def _pack(x):
    """[B, H, S, D] -> [B, S, H*D], the contrib ops' layout."""
    packed = op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), const([0, 0, -1]))
    return _packed_shape(packed, x, _width(None if x.shape is None else x.shape[1], x))


def _packed_shape(y, x, width: int | None):
    """``y``, typed [B, S, width] with the B and S of ``x`` [B, H, S, D] where known: the
    exporter's symbolic sizes (named after the graph inputs' axes once it is done), which
    let size reads move to the graph inputs (codegen/onnx/sizes.py) and the Reshape pairs
    around the contrib ops cancel (lean.SameShapeReshape); onnx cannot infer these."""
    if x.shape is not None and len(x.shape) == 4 and width is not None:
        y.shape = ir.Shape([x.shape[0], x.shape[2], width])
    return y


def _width(heads, v) -> int | None:
    """H*Dv, the width of an attention output over ``v`` [B, Hkv, S, Dv], where known."""
    size = None if v.shape is None else v.shape[3]
    return heads * size if isinstance(heads, int) and isinstance(size, int) else None


def _unpack(y, heads: int):
    """[B, S, H*D] -> [B, H, S, D]."""
    return op.Transpose(op.Reshape(y, const([0, 0, heads, -1])), perm=[0, 2, 1, 3])


def group_query(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap):
    """com.microsoft.GroupQueryAttention on a causal self-attention (Sq == Sk, no past): its
    causal mask equals the site's."""
    del is_causal  # GroupQueryAttention is always causal; plan() checked the site is
    y, _, _ = _group_query(q, k, v, None, None, None, attn_mask, scale=scale, spec=spec,
                           softcap=softcap)
    return y


def _group_query(q, k, v, past_key, past_value, total, attn_mask, *, scale, spec: MaskSpec,
                 softcap):
    """GroupQueryAttention over ``total`` (scalar int64; None: P + S, read off the packed
    inputs) keys, past included: causal bottom-right, seqlens_k = total - 1 for every row (no
    padding). The model's mask and sparsity other than a plain window go in attention_bias (NaN
    rows, all keys masked, become zeros after). Returns (y [B, Hq, S, Dv], present_key,
    present_value)."""
    hq, hkv = q.shape[1], k.shape[1]
    # sizes are read off the packed [B, S, H*D] inputs, so that the head split's Transpose has
    # one reader and cancels against the packing Transpose (lean.CLEANUP_RULES)
    packed_q, packed_k, packed_v = _pack(q), _pack(k), _pack(v)
    if total is None:
        total = op.Squeeze(op.Shape(packed_k, start=1, end=2))
        if past_key is not None:
            total = op.Add(dim(past_key, 2), total)
    window = spec.window if _plain_window(spec) else -1
    keys = k if past_key is None or not isinstance(spec, TopKSpec) else \
        op.Concat(past_key, k, axis=2)
    keep = None if spec.is_dense or window > 0 else keep_mask(spec, q, keys, total, hkv)
    add = None if attn_mask is None and keep is None else bias(attn_mask, keep, q)
    total32 = op.Cast(total, to=ir.DataType.INT32)
    seqlens = op.Expand(op.Sub(total32, op.Constant(value=ir.tensor(np.int32(1)))),
                        op.Shape(packed_q, start=0, end=1))
    y, present_key, present_value = contrib.GroupQueryAttention(
        packed_q, packed_k, packed_v, past_key, past_value, seqlens, total32, None, None, None,
        add, num_heads=hq, kv_num_heads=hkv, scale=scale, softcap=softcap,
        local_window_size=window)
    y = _unpack(_packed_shape(y, q, _width(hq, v)), hq)
    return (y if add is None else zero_nan(y)), present_key, present_value


def multi_head(q, k, v, attn_mask, *, scale, is_causal, spec: MaskSpec, softcap):
    """com.microsoft.MultiHeadAttention: query packed [B, Sq, H*D], key/value stay BNSH; every
    mask (causal included, top-left) goes in attention_bias."""
    del softcap  # plan() sends softcap sites elsewhere
    keep = causal_keep(q, k) if is_causal else None
    if not spec.is_dense:
        sparse = keep_mask(spec, q, k)
        keep = sparse if keep is None else op.And(keep, sparse)
    add = None if attn_mask is None and keep is None else bias(attn_mask, keep, q)
    y = contrib.MultiHeadAttention(_pack(q), k, v, None, None, add, num_heads=q.shape[1],
                                   scale=scale)
    y = _unpack(_packed_shape(y, q, _width(q.shape[1], v)), q.shape[1])
    return y if add is None else zero_nan(y)


# --- decoder sites: rewriter::cached_attention --------------------------------------------

def _total_length(k, past_key):
    """Scalar int64 P + S: the keys after this step."""
    return op.Add(dim(past_key, 2), dim(k, 2))


def _cache_keep(spec: MaskSpec | TopKSpec, q, k, total, keys=None):
    """[1, Hs, S, P+S] bool: causal bottom-right over ``total`` keys, and the sparsity
    (top-k reads ``keys``, past and new)."""
    keep = causal_keep_bottom_right(q, k, total)
    if spec.is_dense:
        return keep
    return op.And(keep, keep_mask(spec, q, keys if keys is not None else k, total,
                                  k.shape[1]))


def _concat_cache(k, v, past_key, past_value):
    """(present_key, present_value) = cat(past, new) on the sequence axis."""
    return op.Concat(past_key, k, axis=2), op.Concat(past_value, v, axis=2)


def standard_cached(q, k, v, past_key, past_value, *, scale, spec: MaskSpec, softcap):
    """ONNX Attention (opset 23) with its own past_key/past_value inputs (it concatenates and
    returns present_key/present_value); causal bottom-right, as an explicit bool mask."""
    keep = _cache_keep(spec, q, k, _total_length(k, past_key))
    y, present_key, present_value, _ = op.Attention(
        q, k, v, keep, past_key, past_value, scale=scale, is_causal=0, softcap=softcap)
    return y, present_key, present_value


def standard_concat(q, k, v, past_key, past_value, *, scale, spec: MaskSpec, softcap):
    """ONNX Attention over Concat(past, new): for a site re-reading a cache entry an earlier
    site returns as present (share-kv), as ORT's Attention insists on writing a present
    output whenever it is given a past."""
    present_key, present_value = _concat_cache(k, v, past_key, past_value)
    keep = _cache_keep(spec, q, k, _total_length(k, past_key), present_key)
    y, *_ = op.Attention(q, present_key, present_value, keep, scale=scale, is_causal=0,
                         softcap=softcap)
    return y, present_key, present_value


def alibi_cached(q, k, v, past_key, past_value, *, scale, spec, softcap, alibi,
                 decompose: bool):
    """An ALiBi decoder site: Concat(past, new), then attention with the bottom-right causal
    keep-mask (and the sparsity) as -inf and the ALiBi bias over all P + S keys (cache entry j
    is position j, so the bias needs no offset)."""
    present_key, present_value = _concat_cache(k, v, past_key, past_value)
    total = _total_length(k, past_key)
    mask = alibi_mask(None, alibi, q, total, keep=_cache_keep(spec, q, k, total, present_key))
    if decompose:
        y = decomposed(q, present_key, present_value, mask, scale=scale, is_causal=False,
                       spec=MaskSpec(), softcap=softcap, kv_heads=k.shape[1])
    else:
        y, *_ = op.Attention(q, present_key, present_value, mask, scale=scale, is_causal=0,
                             softcap=softcap)
    return y, present_key, present_value


def decomposed_cached(q, k, v, past_key, past_value, *, scale, spec: MaskSpec, softcap):
    """Concat the cache, then the decomposition with a bottom-right causal mask."""
    present_key, present_value = _concat_cache(k, v, past_key, past_value)
    keep = causal_keep_bottom_right(q, k, _total_length(k, past_key))
    y = decomposed(q, present_key, present_value, None, scale=scale, is_causal=False,
                   spec=spec, softcap=softcap, keep=keep, kv_heads=k.shape[1])
    return y, present_key, present_value


def group_query_cached(q, k, v, past_key, past_value, *, scale, spec: MaskSpec, softcap):
    """com.microsoft.GroupQueryAttention with past_key/past_value (BNSH) over P + S keys."""
    return _group_query(q, k, v, past_key, past_value, None, None,
                        scale=scale, spec=spec, softcap=softcap)


# --- bounded decoder sites: rewriter::bounded_cached_attention ----------------------------

def bounded_cached(q, k, v, past_key, past_value, past_length, *, scale, spec: MaskSpec,
                   bound: int, softcap, decompose: bool = False):
    """Attention of S new tokens over Concat(past, new) (L + S keys) with a bool mask on the
    positions (rewriter.ir.ops.bounded_cached_attention: queries at P..P+S-1, entry j at j
    below the sink, else P - L + j): causal and the MaskSpec; then the presents evicted to
    ``bound`` entries."""
    present_key, present_value = _concat_cache(k, v, past_key, past_value)
    q_pos, k_pos = cache_positions(q, past_key, past_length, spec.sink)
    causal = op.Unsqueeze(op.LessOrEqual(k_pos, q_pos), const([0, 1]))  # [1, 1, S, L+S]
    keep = op.And(causal, keep_at(spec, q_pos, k_pos, q.shape[1]))  # [1, Hs, S, L+S]
    if decompose:
        y = decomposed(q, present_key, present_value, None, scale=scale, is_causal=False,
                       spec=MaskSpec(), softcap=softcap, keep=keep, kv_heads=k.shape[1])
    else:
        y, *_ = op.Attention(q, present_key, present_value, keep, scale=scale, is_causal=0,
                             softcap=softcap)
    total = op.Add(dim(past_key, 2), dim(k, 2))
    return (y, evict(present_key, total, spec.sink, bound),
            evict(present_value, total, spec.sink, bound))


def evict(cache, total, sink: int, bound: int):
    """[B, H, T, D] -> [B, H, min(T, bound), D], T = ``total`` (scalar int64): the first
    ``sink`` entries and the last ``bound - sink`` (rewriter.ir.ops.evict). As two Slices with
    computed starts: head [0, min(sink, T)), tail [max(T - (bound - sink), min(sink, T)), T),
    which is the whole while T <= bound."""
    axes, one = const([2]), const([1])
    tail_start = op.Sub(total, const(bound - sink))
    if not sink:  # the tail alone
        return op.Slice(cache, op.Reshape(op.Max(tail_start, const(0)), one), const([_END]),
                        axes)
    head_end = op.Min(const(sink), total)
    head = op.Slice(cache, const([0]), op.Reshape(head_end, one), axes)
    tail = op.Slice(cache, op.Reshape(op.Max(tail_start, head_end), one), const([_END]), axes)
    return op.Concat(head, tail, axis=2)


_END = np.iinfo(np.int64).max


# --- padded decoder sites: rewriter::padded_cached_attention (rewriter.ir.padding) ---------

def padding_positions(attention_mask, input_ids):
    """[B, S] int64: CumSum(attention_mask, 1) - 1, its last S columns (pads: -1)."""
    pos = op.Sub(op.CumSum(op.Cast(attention_mask, to=ir.DataType.INT64), const(1)), const(1))
    return op.Slice(pos, op.Neg(op.Shape(input_ids, start=1, end=2)), const([_END]),
                    const([1]))


def _pad_keep(attention_mask, q, k, total):
    """[B, 1, S, P+S] bool: key j is a token (attention_mask[b, j] == 1) or query i's own
    key (j == P + i), so no row is empty."""
    real = op.Unsqueeze(op.Cast(attention_mask, to=ir.DataType.BOOL), const([1, 2]))
    q_pos, offset, k_pos = positions(q, k, total)
    own = op.Unsqueeze(op.Equal(k_pos, op.Add(q_pos, offset)), const([0, 1]))
    return op.Or(real, own)


def padded_cached(q, k, v, past_key, past_value, attention_mask, *, site: SitePlan, scale,
                  spec: MaskSpec, softcap, alibi=None):
    """A padded decoder site: the cached site's op with the pad keys masked.
    GroupQueryAttention gets them in attention_bias with seqlens_k = P + S - 1 in every row:
    its seqlens_k describes right padding (valid keys 0..seqlens_k), while a left-padded
    batch's pads sit before each row's tokens in a cache of one length. Attention and the
    decomposition get the bool mask (causal bottom-right, sparsity, pads)."""
    total = _total_length(k, past_key)
    pads = _pad_keep(attention_mask, q, k, total)
    if site.op == GQA:  # an additive float mask: bias() tells bool masks by a dtype that
        # values built here do not carry
        neg_inf = op.CastLike(const(float("-inf"), np.float32), q)
        add = op.Where(pads, op.CastLike(const(0.0, np.float32), q), neg_inf)
        return _group_query(q, k, v, past_key, past_value, total, add, scale=scale,
                            spec=spec, softcap=softcap)
    present_key, present_value = _concat_cache(k, v, past_key, past_value)
    keep = op.And(_cache_keep(spec, q, k, total, present_key), pads)
    mask = alibi_mask(None, alibi, q, total, keep=keep) if alibi else keep
    if site.op == DECOMPOSED:
        y = decomposed(q, present_key, present_value, mask if alibi else None, scale=scale,
                       is_causal=False, spec=MaskSpec(), softcap=softcap,
                       keep=None if alibi else keep, kv_heads=k.shape[1])
    else:
        y, *_ = op.Attention(q, present_key, present_value, mask, scale=scale, is_causal=0,
                             softcap=softcap)
    return y, present_key, present_value

