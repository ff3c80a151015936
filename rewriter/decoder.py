"""Decoders with a KV cache: a captured causal LM turned into a step function.

    dec = program.decoder()                    # or rewriter.decoder.build_decoder(program)
    logits, present = dec.step(ids, dec.empty_cache(batch=1))
    tokens = dec.generate(prompt_ids, max_new_tokens=32)    # greedy, with the cache
    last = dec.last_logits_only()              # logits [B, 1, V]: the LM head on one row

``dec.module`` is a GraphModule ``forward(input_ids, past_key_0, past_value_0, ...) ->
(logits, present_key_0, present_value_0, ...)``, built from the program's graph by surgery:

1. every canonical ``rewriter::attention`` becomes ``rewriter::cached_attention`` over
   ``cat(past, new)`` with a bottom-right causal mask (the model's own [S, S] mask is dropped:
   only sites whose mask is causal qualify);
2. one cache entry per distinct K (resp. V) tensor: layers that share K/V (share-kv) share it;
3. sequence positions (every ``arange(S)`` of the token axis: rotary and learned position
   embeddings alike) start at the past length P instead of 0, as Hugging Face's cache_position;
4. bounded caches (StreamingLLM): a KV head whose every reader masks to sink + window keeps
   only the sink and the last W - 1 positions (``rewriter::bounded_cached_attention``). A site
   whose KV heads differ (``sparse:heads=auto``: some full, some streaming) is split into one
   op per group of KV heads with the same bound, each with its own cache entry; the query heads'
   outputs are put back in order. Such a decoder has one more input and output, ``past_length``
   / ``present_length`` (int64 scalars: P, P + S), since bounded caches no longer tell P.
5. padded batches (``padded=True``; ``Decoder.generate(..., attention_mask=...)`` builds one
   when it needs it): one more input, ``attention_mask`` [B, P + S] (1 token, 0 left pad, as
   in Hugging Face), read by ``rewriter::padded_cached_attention`` (pad keys masked) and
   ``rewriter::padding_positions`` (per-row positions cumsum(mask) - 1, rewriter.ir.padding):
   each ``arange(S)`` reaching the model as ``position_ids`` [1, S] (RoPE, learned
   embeddings) becomes the per-row [B, S] positions, and a model counting positions from an
   all-ones mask (OPT) counts them from the real one. Caches are unbounded (eviction by
   index would keep pads), and sparsity must not depend on absolute positions (no sinks, no
   top-k). Built padded decoders are also checked on a left-padded batch against each row
   alone.

Shape glossary: B batch, S new tokens, P cached tokens, Hkv KV heads of a cache entry, D head
dim. Cache entries are [B, Hkv, P, D] ([B, Hkv, min(P, bound), D] when bounded). Built
decoders are checked against the full program (prefill + one step == one forward over the whole
sequence) before they are returned.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.fx import CodeGen, Graph, GraphModule, Node
from torch.utils._pytree import tree_leaves

from rewriter.analysis.quality import logits_fn
from rewriter.errors import RewriterError, first_line
from rewriter.ir.graph import ancestors, canonical_nodes, cleanup, copy_graph, descendants
from rewriter.ir.masks import MaskSpec
from rewriter.ir.ops import attention as _attention_op  # noqa: F401  (registers the ops)
from rewriter.ir.padding import check_attention_mask
from rewriter.ir.precision import (
    EXACT_TOLERANCE,
    float64_module,
    max_relative_error,
    to_float64,
)
from rewriter.ir.topk import is_topk
from rewriter.passes.last_position import LastPositionError, keep_last_position
from rewriter.patterns.static_values import NotProven, read_structure

__all__ = ["CacheEntry", "Decoder", "DecoderError", "build_decoder", "greedy_reference",
           "is_causal_lm"]

aten = torch.ops.aten
CACHED = torch.ops.rewriter.cached_attention.default
BOUNDED = torch.ops.rewriter.bounded_cached_attention.default
PADDED = torch.ops.rewriter.padded_cached_attention.default
POSITIONS = torch.ops.rewriter.padding_positions.default
_ATTENTION = torch.ops.rewriter.attention.default
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_CAUSAL_MASKS = ("causal", "causal-mask")


class DecoderError(RewriterError):
    """The program cannot be turned into a decoder with a KV cache."""


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: input ``past_<kind>_<n>``, output ``present_<kind>_<n>``."""

    kind: str  # "key" or "value"
    index: int
    heads: int  # Hkv
    head_dim: int  # D (Dv for values)
    sites: tuple[int, ...]  # the sites reading it (several with share-kv)
    bound: int | None = None  # positions kept (sink + W - 1) when bounded, else None
    kv_heads: tuple[int, ...] | None = None  # the source's KV heads it holds (None: all)

    def positions(self, past: int) -> int:
        """Cached positions after ``past`` tokens."""
        return past if self.bound is None else min(past, self.bound)

    def bytes(self, past: int, bytes_per_element: int = 2) -> int:
        return self.heads * self.head_dim * self.positions(past) * bytes_per_element

    @property
    def input_name(self) -> str:
        return f"past_{self.kind}_{self.index}"

    @property
    def output_name(self) -> str:
        return f"present_{self.kind}_{self.index}"


@dataclass
class Decoder:
    """A step function over a KV cache (see the module docstring)."""

    module: GraphModule
    cache: list[CacheEntry]
    program: object = field(repr=False)
    sites_by_node: dict = field(default_factory=dict, repr=False)  # cached node -> site
    verify_error: float = float("nan")  # max |prefill+step - full| / max |full|, float64
    padded: bool = False  # takes attention_mask [B, P + S] (left-padded batches)
    # inputs computed once per sequence, after the cache ones (an encoder's cross K/V)
    context: tuple[str, ...] = ()
    last_logits: bool = False  # logits [B, 1, V] for the last position only (last_logits_only)
    _padded_decoder: Decoder | None = field(default=None, repr=False, compare=False)

    @property
    def static_batch(self) -> int | None:
        """The batch size when the capture fixed it (torch.export pins a size-1 batch)."""
        return _static_batch(self.module)

    @property
    def bounded(self) -> bool:
        """Whether some cache entry is bounded (then past_length/present_length exist)."""
        return any(e.bound is not None for e in self.cache)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *(e.input_name for e in self.cache),
                *(["past_length"] if self.bounded else []),
                *(["attention_mask"] if self.padded else []), *self.context]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(e.output_name for e in self.cache),
                *(["present_length"] if self.bounded else [])]

    def context_axes(self) -> list[dict[int, str]]:
        """Per context input, its dynamic axes: {axis: "batch" | "encoder_sequence"}."""
        placeholders = {n.name: n for n in self.module.graph.nodes if n.op == "placeholder"}
        return [dict(placeholders[name].meta.get("rewriter_axes", {}))
                for name in self.context]

    def cache_bytes(self, past: int, bytes_per_element: int = 2) -> int:
        """Bytes of the whole cache after ``past`` tokens (bf16 by default)."""
        return sum(e.bytes(past, bytes_per_element) for e in self.cache)

    def cache_report(self, bytes_per_element: int = 2) -> dict:
        """Cache bytes per token of the unbounded entries, the bounded entries' bytes at their
        bound, and the largest bound (tokens)."""
        unbounded = [e for e in self.cache if e.bound is None]
        bounded = [e for e in self.cache if e.bound is not None]
        return {"bytes_per_element": bytes_per_element,
                "unbounded_bytes_per_token": sum(e.bytes(1, bytes_per_element)
                                                 for e in unbounded),
                "bounded_bytes": sum(e.bytes(e.bound, bytes_per_element) for e in bounded),
                "bound_tokens": max((e.bound for e in bounded), default=None),
                "entries": len(self.cache), "bounded_entries": len(bounded)}

    def example_inputs(self, batch: int = 2, seq: int = 5, past: int = 3
                       ) -> list[torch.Tensor]:
        """Inputs in the step's order: token ids [B, S], zero past tensors [B, Hkv, P, D]."""
        return _example_inputs(self.module, batch, seq, past)

    def empty_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zero-length past tensors [B, Hkv, 0, D], one per cache entry (and past_length 0
        when bounded)."""
        dtype = dtype or _param_dtype(self.module)
        past = [torch.zeros(batch, e.heads, 0, e.head_dim, dtype=dtype) for e in self.cache]
        return past + ([torch.zeros((), dtype=torch.long)] if self.bounded else [])

    def step(self, input_ids: torch.Tensor, past: list[torch.Tensor],
             attention_mask: torch.Tensor | None = None, context: Sequence[torch.Tensor] = ()
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, S, V], or [B, 1, V] with ``last_logits``, present cache) for S new
        tokens after ``past``;
        ``attention_mask`` [B, P + S] for a padded decoder (None: all ones); ``context``: the
        tensors named by ``self.context`` (rewriter.seq2seq: the encoder's outputs)."""
        if len(context) != len(self.context):
            raise DecoderError(f"this decoder takes {len(self.context)} context tensors "
                               f"({', '.join(self.context) or 'none'}), got {len(context)}")
        extra = []
        if self.padded:
            if attention_mask is None:
                total = (past[0].shape[2] if past else 0) + input_ids.shape[1]
                attention_mask = torch.ones(input_ids.shape[0], total, dtype=torch.long)
            extra = [attention_mask]
        elif attention_mask is not None:
            raise DecoderError("this decoder takes no attention_mask: build it with "
                               "padded=True (build_decoder / Program.decoder)")
        with torch.no_grad():
            logits, *present = self.module(input_ids, *past, *extra, *context)
        return logits, present

    def last_logits_only(self, tolerance: float = EXACT_TOLERANCE) -> Decoder:
        """This decoder with logits for the last position only, [B, 1, V]: all that greedy
        and sampled generation read. The LM head then runs on one row instead of S (about a
        fifth of a small model's prefill FLOPs; rewriter.passes.last_position). Checked
        against this decoder's last row (float64, ``tolerance``); DecoderError when the
        logits are not a position-wise function of one final projection."""
        if self.last_logits:
            return self
        module = GraphModule(self.module, copy_graph(self.module), class_name="Decoder")
        try:
            keep_last_position(module)
        except LastPositionError as exc:
            raise DecoderError(f"cannot keep only the last position's logits: {exc}") from exc
        _propagate_fake(module)
        shared: dict = {}
        inputs = to_float64(self.example_inputs())
        with torch.no_grad():
            want = float64_module(self.module, shared)(*inputs)[0][:, -1:]
            got = float64_module(module, shared)(*inputs)[0]
        err = max_relative_error(got, want)
        if not err <= tolerance:
            raise DecoderError(f"logits of the last position only differ from the decoder's "
                               f"last row (max relative error {err:.2e} > {tolerance:g})")
        # the copy keeps node names, which is what sites_by_node is keyed by
        return replace(self, module=module, last_logits=True, _padded_decoder=None)

    def padded_decoder(self) -> Decoder:
        """This decoder if it is padded, else one built with ``padded=True`` from the same
        program (once, then kept)."""
        if self.padded:
            return self
        if self._padded_decoder is None:
            self._padded_decoder = build_decoder(self.program, padded=True)
        return self._padded_decoder

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: the prompt [B, S] followed by ``max_new_tokens`` tokens.
        ``attention_mask`` [B, S] (1 token, 0 pad) for left-padded prompts: each row then
        generates what it would alone (a decoder built without ``padded`` hands a batch with
        pads to its ``padded_decoder()``)."""
        mask = None if attention_mask is None else check_attention_mask(input_ids,
                                                                        attention_mask)
        if mask is not None and not self.padded:
            if bool(mask.all()):
                mask = None
            else:
                return self.padded_decoder().generate(input_ids, max_new_tokens, mask)
        token, past, out = input_ids, self.empty_cache(input_ids.shape[0]), [input_ids]
        for _ in range(max_new_tokens):
            logits, past = self.step(token, past, mask)
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.cat(out, dim=1)


def greedy_reference(program, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: one full forward of ``program`` per new token."""
    ids, logits_of = input_ids, logits_fn(program)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = logits_of(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def build_decoder(program, *, check: bool = True, bounded: bool = True,
                  padded: bool = False) -> Decoder:
    """The program as a decoder step with a KV cache; raises DecoderError when the program is
    not a causal LM of causal self-attention sites, or when the decoder does not reproduce the
    program (``check``: prefill of a prompt plus one step against one full forward).
    ``bounded``: sink + window KV heads keep only what their mask reads (else every entry
    keeps every token). ``padded``: an ``attention_mask`` input for left-padded batches
    (module docstring, item 5; implies unbounded caches)."""
    _check_sites(program)
    graph = copy_graph(program.module)
    decoder = cached_step(program, graph, _token_input(graph), bounded=bounded, padded=padded)
    if check:
        decoder.verify_error = check_decoder(decoder)
        if padded:
            decoder.verify_error = max(decoder.verify_error, check_padded(decoder))
    return decoder


def is_causal_lm(program) -> bool:
    """Whether ``program`` looks like a causal LM to build_decoder (causal self-attention sites,
    token ids [B, S] its one dynamic tensor input): what ``export --kv-cache`` defaults on.
    Cheap and structural; build_decoder's own checks still run on the build."""
    try:
        _check_sites(program)
        _token_input(program.module.graph)
    except DecoderError:
        return False
    return True


def cached_step(program, graph: Graph, ids: Node, *, bounded: bool = True,
                padded: bool = False) -> Decoder:
    """The cache surgery on ``graph`` (a copy of ``program``'s, or the decoder half of an
    encoder-decoder: rewriter.seq2seq), whose token input is ``ids``; not checked. Canonical
    nodes whose K/V do not read ``ids`` (cross attention over context inputs) stay as they
    are; the other tensor inputs become the decoder's ``context``."""
    reads_ids = descendants(ids)
    canonical = [n for n in canonical_nodes(graph).values() if n.args[1] in reads_ids]
    if not canonical:
        raise DecoderError("the program has no rewriter::attention nodes over its tokens "
                           "(compiled for a backend?): build the decoder from the program "
                           "before compile()")
    sites = {s.node: s for s in program.sites}
    full_masks = _full_length_masks(canonical, sites, padded)
    if padded:
        _check_padding_sites(canonical)
        bounded = False
    groups = _head_groups(canonical, bounded, unbounded=full_masks)
    pasts, past_len, length = _add_cache_inputs(graph, ids, canonical, sites, groups)
    mask = _add_mask_input(graph, pasts) if padded else None
    rows, copies = _mask_rows(graph, ids, full_masks, past_len, reads_ids)
    shifted = _shift_positions(graph, ids, past_len, skip=copies)
    if padded:
        shifted += _per_row_positions(graph, ids, past_len, mask)
    if not shifted and not rows:
        raise DecoderError("no arange over the token axis found: cannot tell where the model "
                           "computes positions, so cached decoding would restart them at 0")
    presents, cached_sites = _attend_over_cache(graph, canonical, pasts, sites, groups, length,
                                                rows)
    if padded:
        cached_sites = _mask_keys(graph, mask, cached_sites)
    for node in canonical_nodes(graph).values():  # cross attention, left as it is
        if node.name in sites:
            cached_sites.setdefault(node.name, sites[node.name])
    cache = _set_outputs(graph, pasts, presents, length)
    _drop_static_inputs(graph)
    graph.set_codegen(CodeGen())  # a plain forward(input_ids, past_key_0, ...) signature
    module = GraphModule(program.module, graph, class_name="Decoder")
    cleanup(module)
    try:
        _propagate_fake(module)
    except Exception as exc:
        if not padded:
            raise
        raise DecoderError(f"the model's position computation cannot take per-row positions "
                           f"[B, S] (padded=True): {first_line(exc)}") from exc
    known = {"past_length", "attention_mask", *(e.input_name for e in cache)}
    context = [n for n in module.graph.nodes if n.op == "placeholder"
               and n is not ids and n.name not in known]
    for node in context:  # read only by what the surgery replaced
        if not node.users:
            module.graph.erase_node(node)
    module.recompile()
    context = tuple(n.name for n in context if n.users)
    return Decoder(module, cache, program, cached_sites, padded=padded, context=context)


def _full_length_masks(canonical: list[Node], sites: dict, padded: bool) -> set[Node]:
    """The self-attention nodes whose mask the cache surgery cannot drop for plain
    bottom-right causal, but whose mask is a function of positions alone (T5's relative
    position bias with its causal mask): the decoder computes it over all P + S positions and
    keeps the last S query rows (``_mask_rows``). Any other mask is a DecoderError."""
    out = set()
    for node in canonical:
        site = sites.get(node.name)
        where = f"site {site.index}" if site is not None else f"attention {node.name}"
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is None:
            if node.kwargs.get("is_causal"):
                continue
            raise DecoderError(f"{where} is bidirectional (no causal mask): a decoder cache "
                               "covers causal self-attention only")
        if site is not None and site.mask in _CAUSAL_MASKS:
            continue  # proven causal at capture: the cached op's own mask replaces it
        kind = site.mask if site is not None else "mask"
        try:
            read_structure(mask, "mask", cumsum=False)
        except NotProven as exc:
            raise DecoderError(f"{where} has mask {kind!r}, which a decoder cache cannot "
                               f"serve: {exc}") from None
        if padded:
            raise DecoderError(f"{where} has mask {kind!r} (computed from positions): padded "
                               "batches are not supported for it; generate each prompt alone")
        if node.kwargs.get("is_causal"):
            raise DecoderError(f"{where} has both a mask ({kind!r}) and is_causal: the cache "
                               "surgery serves one or the other")
        out.add(node)
    return out


def _mask_rows(graph: Graph, ids: Node, nodes: set[Node], past_len: Node, reads_ids: set[Node]
               ) -> tuple[dict[Node, Node], set[Node]]:
    """For each node of ``_full_length_masks``: its mask computed as in one forward over all
    P + S tokens (the mask's subgraph copied, reading a [B, P + S] stand-in for the token ids:
    it reads them only through their shape), then its last S query rows. Returns {node: rows}
    and the copied nodes (their aranges are already over all positions: not shifted)."""
    if not nodes:
        return {}, set()
    with graph.inserting_after(past_len):
        new = graph.call_function(aten.sym_size.int, (ids, 1))
    with graph.inserting_after(new):
        total = graph.call_function(operator.add, (new, past_len))
    batch, last = ids.meta["val"].shape[0], total
    if isinstance(batch, torch.SymInt):
        with graph.inserting_after(total):
            batch = last = graph.call_function(aten.sym_size.int, (ids, 0))
    with graph.inserting_after(last):
        stand_in = graph.call_function(aten.new_zeros.default, (ids, [batch, total]))
    env: dict[Node, Node] = {ids: stand_in}
    copies = {new, total, stand_in} | ({batch} if isinstance(batch, Node) else set())
    rows = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__):
        mask = node.args[3] if len(node.args) > 3 else node.kwargs["attn_mask"]
        needed = sorted(ancestors(mask) & reads_ids - env.keys(), key=order.__getitem__)
        if mask not in reads_ids:
            raise DecoderError(f"attention {node.name}'s mask does not depend on the sequence "
                               "length (a mask of fixed size): the decoder cannot extend it")
        with graph.inserting_before(node):
            for n in needed:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
                copies.add(env[n])
            shape = mask.meta["val"].shape
            full = env[mask]
            if shape[-2] == 1:  # one row for every query: nothing to select
                rows[node] = full
            else:
                rows[node] = graph.call_function(aten.slice.Tensor,
                                                 (full, len(shape) - 2, past_len, total))
            copies.add(rows[node])
    return rows, copies


@dataclass(frozen=True)
class _Group:
    """KV heads of one K/V source that share a cache bound (None: unbounded)."""

    kv_heads: tuple[int, ...]
    bound: int | None
    whole: bool  # all the source's KV heads (no split needed)


def _head_groups(canonical: list[Node], bounded: bool = True, unbounded: set[Node] = frozenset()
                 ) -> dict[tuple[Node, Node], list[_Group]]:
    """Per (K, V) source: its KV heads grouped by cache bound. A KV head is bounded when every
    site reading it masks it to the same sink and some window (rewriter.ir.masks); its bound
    is the largest its readers need."""
    readers: dict[tuple[Node, Node], list[Node]] = {}
    for node in canonical:
        readers.setdefault((node.args[1], node.args[2]), []).append(node)
    groups = {}
    for pair, nodes in readers.items():
        hkv = int(pair[0].meta["val"].shape[1])
        bounds: list[int | None] | None = None
        sinks = set()
        for node in nodes:
            sparsity = node.kwargs.get("sparsity", "")
            if is_topk(sparsity) or not sparsity:
                per_kv = [None] * hkv
            else:
                spec = MaskSpec.parse(sparsity)
                sinks.add(spec.sink)
                per_kv = spec.kv_head_bounds(int(node.args[0].meta["val"].shape[1]), hkv)
            bounds = per_kv if bounds is None else [
                None if a is None or b is None else max(a, b)
                for a, b in zip(bounds, per_kv, strict=True)]
        # readers would evict differently; ALiBi (and a mask over all positions) reads
        # positions an evicted cache loses
        if len(sinks) > 1 or not bounded or any(n.kwargs.get("alibi") or n in unbounded
                                                for n in nodes):
            bounds = [None] * hkv
        by_bound: dict[int | None, list[int]] = {}
        for g, b in enumerate(bounds):
            by_bound.setdefault(b, []).append(g)
        groups[pair] = [_Group(tuple(heads), b, len(by_bound) == 1)
                        for b, heads in by_bound.items()]
    return groups


def _add_cache_inputs(graph: Graph, ids: Node, canonical: list[Node], sites: dict,
                      groups: dict) -> tuple[dict, Node, Node | None]:
    """A past_<kind>_<n> placeholder per (K/V node, head group), in first-use order, and a
    past_length placeholder when some group is bounded; returns {(K/V node, group): (its
    placeholder, entry)}, a node holding P (the past length) and the past_length node."""
    read_by: dict[Node, list[int]] = {}
    for node in canonical:
        site = sites.get(node.name)
        for source in node.args[1:3]:
            read_by.setdefault(source, []).append(-1 if site is None else site.index)
    pasts: dict[tuple[Node, _Group], tuple[Node, CacheEntry]] = {}
    counts = {"key": 0, "value": 0}
    last = ids
    for pair, pair_groups in groups.items():
        for group in pair_groups:  # inputs in cache order: key_n, value_n, key_n+1, ...
            for kind, source in zip(("key", "value"), pair, strict=True):
                if (source, group) in pasts:  # one tensor read as both key and value
                    continue
                val = source.meta["val"]  # [B, Hkv, S, D]
                entry = CacheEntry(kind, counts[kind], len(group.kv_heads), int(val.shape[3]),
                                   tuple(dict.fromkeys(read_by[source])), group.bound,
                                   None if group.whole else group.kv_heads)
                counts[kind] += 1
                with graph.inserting_after(last):
                    last = graph.placeholder(entry.input_name)
                # rank, dtype and the entry's head count; re-derived at the end
                last.meta["val"] = val if group.whole else val.new_empty(
                    (val.shape[0], len(group.kv_heads), *val.shape[2:]))
                pasts[(source, group)] = (last, entry)
    length = None
    if any(g.bound is not None for gs in groups.values() for g in gs):
        with graph.inserting_after(last):
            last = length = graph.placeholder("past_length")
        length.meta["val"] = torch.zeros((), dtype=torch.long)
    with graph.inserting_after(last):
        if length is not None:  # bounded caches do not tell P: the input does
            past_len = length
        else:
            past_len = graph.call_function(aten.sym_size.int, (next(iter(pasts.values()))[0], 2))
    return pasts, past_len, length


def _attend_over_cache(graph: Graph, canonical: list[Node], pasts: dict, sites: dict,
                       groups: dict, length: Node | None, rows: dict[Node, Node]
                       ) -> tuple[dict, dict[str, object]]:
    """Each canonical node -> one cached (or bounded) attention op per head group, outputs
    concatenated back in query-head order; a node in ``rows`` (a mask over all positions,
    ``_mask_rows``) -> the canonical op over cat(past, new) with those rows as its mask.
    Returns {(K/V node, group): its present} (from the first site reading it) and {cached
    node name: site}."""
    presents: dict[tuple[Node, _Group], Node] = {}
    cached_sites: dict[str, object] = {}
    for node in canonical:
        q, k, v = node.args[:3]
        kw = node.kwargs
        hq, hkv = int(q.meta["val"].shape[1]), int(k.meta["val"].shape[1])
        group_size = hq // hkv
        outs, order = [], []
        with graph.inserting_before(node):
            for group in groups[(k, v)]:
                q_heads = [g * group_size + j for g in group.kv_heads for j in range(group_size)]
                sparsity = kw.get("sparsity", "")
                if group.whole:
                    qq, kk, vv = q, k, v
                else:
                    qq = _select_heads(graph, q, q_heads)
                    kk = _select_heads(graph, k, list(group.kv_heads))
                    vv = kk if v is k else _select_heads(graph, v, list(group.kv_heads))
                    if sparsity and not is_topk(sparsity):
                        sparsity = MaskSpec.parse(sparsity).select_heads(q_heads, hq).format()
                attrs = {"scale": kw["scale"], "sparsity": sparsity,
                         "softcap": kw.get("softcap", 0.0)}
                if kw.get("alibi"):  # per query head; cache entry j is position j: exact
                    attrs["alibi"] = [float(kw["alibi"][h]) for h in q_heads]
                past_k, past_v = pasts[(k, group)][0], pasts[(v, group)][0]
                if node in rows:  # one whole group, unbounded (_head_groups)
                    cached, *present = _attend_rows(graph, qq, kk, vv, past_k, past_v,
                                                    rows[node], attrs)
                else:
                    if group.bound is None:
                        cached = graph.call_function(CACHED, (qq, kk, vv, past_k, past_v),
                                                     attrs)
                    else:
                        cached = graph.call_function(
                            BOUNDED, (qq, kk, vv, past_k, past_v, length),
                            {**attrs, "bound": group.bound})
                    present = [graph.call_function(operator.getitem, (cached, i))
                               for i in (1, 2)]
                    outs.append(graph.call_function(operator.getitem, (cached, 0)))
                if node in rows:
                    outs.append(cached)
                order += q_heads
                for source, tensor in zip((k, v), present, strict=True):
                    presents.setdefault((source, group), tensor)
                if node.name in sites:
                    cached_sites[cached.name] = sites[node.name]
            out = outs[0] if len(outs) == 1 else graph.call_function(aten.cat.default, (outs, 1))
            if order != sorted(order):
                inverse = sorted(range(len(order)), key=order.__getitem__)
                out = _select_heads(graph, out, inverse)
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return presents, cached_sites


def _attend_rows(graph: Graph, q: Node, k: Node, v: Node, past_k: Node, past_v: Node,
                 rows: Node, attrs: dict) -> tuple[Node, Node, Node]:
    """(out, present K, present V), as the cached ops return: the canonical op over
    cat(past, new) with ``rows`` [.., S, P + S] as its mask."""
    keys = graph.call_function(aten.cat.default, ([past_k, k], 2))
    values = keys if v is k else graph.call_function(aten.cat.default, ([past_v, v], 2))
    return graph.call_function(_ATTENTION, (q, keys, values, rows), attrs), keys, values


def _select_heads(graph: Graph, x: Node, heads: list[int]) -> Node:
    """x[:, heads] on axis 1, as slices of its contiguous runs (concatenated when several)."""
    runs, start = [], 0
    for i in range(1, len(heads) + 1):
        if i == len(heads) or heads[i] != heads[i - 1] + 1:
            runs.append((heads[start], heads[i - 1] + 1))
            start = i
    parts = [graph.call_function(aten.slice.Tensor, (x, 1, lo, hi)) for lo, hi in runs]
    return parts[0] if len(parts) == 1 else graph.call_function(aten.cat.default, (parts, 1))


def _set_outputs(graph: Graph, pasts: dict, presents: dict, length: Node | None
                 ) -> list[CacheEntry]:
    """Outputs: logits (the model's first output), then the presents in cache order
    (key_0, value_0, key_1, ...) and present_length when bounded; returns the cache entries
    in that order."""
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = [x for x in tree_leaves(output.args[0]) if isinstance(x, Node)]
    if not leaves:
        raise DecoderError("the program has no tensor output to take logits from")
    order = sorted(pasts, key=lambda src: (pasts[src][1].index, pasts[src][1].kind != "key"))
    extra = []
    if length is not None:
        with graph.inserting_before(output):
            ids = next(n for n in graph.nodes if n.op == "placeholder")
            new = graph.call_function(aten.sym_size.int, (ids, 1))
            extra.append(graph.call_function(aten.add.Tensor, (length, new)))
    graph.erase_node(output)
    graph.output((leaves[0], *(presents[src] for src in order), *extra))
    return [pasts[src][1] for src in order]


def check_decoder(decoder: Decoder, prompt_len: int = 7, batch: int = 2,
                  tolerance: float = EXACT_TOLERANCE) -> float:
    """Prefill ``prompt_len`` tokens, step one more (a prefill of all of them when a site
    selects top-k blocks per call), and compare each logits row with one forward of the
    program over all of them, both in float64 (rewriter.ir.precision), so fp32
    rounding cannot pass for a wrong surgery nor fail a right one; raises DecoderError past
    ``tolerance``. Returns the max relative error."""
    program = decoder.program
    batch = decoder.static_batch or batch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(decoder), (batch, prompt_len + 1), generator=gen)
    shared: dict = {}  # one float64 copy of the weights for both modules
    step = float64_module(decoder.module, shared)
    # top-k sites select per call (rewriter.ir.topk): a step selects for itself, so only a
    # prefill of the whole text is held to the program's forward
    dynamic = any(is_topk(s.sparsity) for s in program.sites)
    def ones(n: int) -> list[torch.Tensor]:  # a padded decoder's mask, nothing padded
        return [torch.ones(batch, n, dtype=torch.long)] if decoder.padded else []

    with torch.no_grad():
        want = logits_fn(program, float64_module(program.module, shared))(ids)
        if dynamic:
            got, *_ = step(ids, *decoder.empty_cache(batch, torch.float64), *ones(ids.shape[1]))
        else:
            first, *past = step(ids[:, :-1], *decoder.empty_cache(batch, torch.float64),
                                *ones(prompt_len))
            last, *_ = step(ids[:, -1:], *past, *ones(prompt_len + 1))
            got = torch.cat([first, last], dim=1)
    err = max_relative_error(got, want)
    if not err <= tolerance:
        raise DecoderError(f"the decoder does not reproduce the program (prefill + step vs one "
                           f"forward in float64: max relative error {err:.2e} > {tolerance:g}); "
                           "the model computes positions or masks in a way the cache surgery "
                           "misses")
    return err


def check_padded(decoder: Decoder, prompt_len: int = 7, tolerance: float = EXACT_TOLERANCE
                 ) -> float:
    """A padded decoder on a left-padded batch (rows with 0, 3 and 5 pads; prefill of all but
    the last token, then one step) against one forward of the program over each row's tokens
    alone, both in float64, on the real tokens' logits; raises DecoderError past
    ``tolerance``. Returns the max relative error."""
    program = decoder.program
    pads = [0, 3, 5][: decoder.static_batch or 3]
    if decoder.static_batch == 1:
        pads = [2]
    batch = len(pads)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, _vocab_size(decoder), (batch, prompt_len + 1), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    shared: dict = {}
    step = float64_module(decoder.module, shared)
    alone = logits_fn(program, float64_module(program.module, shared))
    with torch.no_grad():
        first, *past = step(ids[:, :-1], *decoder.empty_cache(batch, torch.float64),
                            mask[:, :-1])
        last, *_ = step(ids[:, -1:], *past, mask)
        got = torch.cat([first, last], dim=1)
        err = 0.0
        for row, pad in enumerate(pads):
            want = alone(ids[row:row + 1, pad:])[0]
            err = max(err, max_relative_error(got[row, pad:], want))
    if not err <= tolerance:
        raise DecoderError(f"the padded decoder does not reproduce the program on a "
                           f"left-padded batch (each row against its tokens alone, in float64: "
                           f"max relative error {err:.2e} > {tolerance:g}); the model computes "
                           "positions in a way the padding surgery misses")
    return err


# --- graph surgery helpers -----------------------------------------------------------------

def _check_sites(program) -> None:
    """A causal LM's sites: self-attention (masks are checked on the graph, by
    ``_full_length_masks``)."""
    if not program.sites:
        raise DecoderError("the program has no attention sites")
    cross = next((s for s in program.sites if s.cross), None)
    if cross is not None:
        raise DecoderError(f"site {cross.index} ({cross.module_path or 'attention'}) is cross "
                           "attention: build an encoder-decoder's decoder with "
                           "rewriter.seq2seq (Program.decoder() does when the program "
                           "takes decoder_input_ids)")
    for s in program.sites:
        if "causal" not in s.mask:  # 'relative-bias+causal-mask' is checked on the graph
            raise DecoderError(f"site {s.index} has mask {s.mask!r}: a decoder cache covers "
                               "causal self-attention only (mask 'causal' or 'causal-mask')")


def _token_input(graph: Graph) -> Node:
    tensors = [n for n in graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor)]
    if len(tensors) != 1 or tensors[0].meta["val"].is_floating_point() \
            or tensors[0].meta["val"].dim() != 2:
        names = [n.name for n in tensors]
        raise DecoderError(f"a decoder needs a causal LM captured on token ids [B, S] alone "
                           f"(tensor inputs: {names})")
    ids = tensors[0]
    if not isinstance(ids.meta["val"].shape[1], torch.SymInt):
        raise DecoderError("the program was captured with a static sequence length: capture "
                           "with dynamic=True to build a decoder")
    return ids


def _shift_positions(graph: Graph, ids: Node, past_len: Node, skip: set[Node] = frozenset()
                     ) -> int:
    """Add P to every arange over the token axis (arange(S) or arange(0, S)), but those in
    ``skip``; returns how many."""
    seq = str(ids.meta["val"].shape[1])
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGE or node in skip:
            continue
        val = node.meta.get("val")
        starts_at_zero = node.target is aten.arange.default or node.args[0] == 0
        if val is None or val.dim() != 1 or str(val.shape[0]) != seq or not starts_at_zero:
            continue
        if node.target is aten.arange.start_step and node.args[2] != 1:
            continue
        with graph.inserting_after(node):
            shifted = graph.call_function(aten.add.Tensor, (node, past_len))
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user, s=shifted: user is not s)
        count += 1
    return count


def _check_padding_sites(canonical: list[Node]) -> None:
    """Padded decoders apply sparsity on cache indices, which a row's pads shift from its
    positions: only masks of relative positions (window, dilation, per-head windows) qualify."""
    for node in canonical:
        sparsity = node.kwargs.get("sparsity", "")
        if not sparsity:
            continue
        spec = None if is_topk(sparsity) else MaskSpec.parse(sparsity)
        if spec is None or spec.sink or spec.neighborhood is not None:
            raise DecoderError(f"attention {node.name} has sparsity {sparsity!r}, which reads "
                               "absolute positions (sinks, top-k blocks, grids): padded "
                               "batches (attention_mask) are not supported for it; generate "
                               "each prompt alone")


def _add_mask_input(graph: Graph, pasts: dict) -> Node:
    """The attention_mask [B, P + S] placeholder, after the cache inputs."""
    placeholders = {node for node, _ in pasts.values()}
    last = [n for n in graph.nodes if n in placeholders][-1]
    with graph.inserting_after(last):
        mask = graph.placeholder("attention_mask")
    mask.meta["val"] = torch.ones(2, 2, dtype=torch.long)  # re-derived at the end
    return mask


def _per_row_positions(graph: Graph, ids: Node, past_len: Node, mask: Node) -> int:
    """Per-row positions (rewriter::padding_positions) where the model takes them: every
    ``unsqueeze(arange(S) + P [+ c], 0)`` ([1, S] position_ids) becomes the [B, S] positions
    (pads clamped to 0), and an all-ones [B, S] mask the model counts positions from by cumsum
    (OPT) becomes the real one (and its cumsum the real count). Returns how many."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        raw = graph.call_function(POSITIONS, (mask, ids))  # [B, S], pads -1
    with graph.inserting_after(raw):
        pos = graph.call_function(aten.clamp_min.default, (raw, 0))
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.add.Tensor \
                and len(node.args) == 2 and node.args[1] is past_len \
                and getattr(node.args[0], "target", None) in _ARANGE:
            count += _rows_from(graph, node, pos, 0)
    seq_shape = [str(d) for d in ids.meta["val"].shape]
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.ones.default,
                                                             aten.new_ones.default):
            continue
        val = node.meta.get("val")
        sums = [u for u in node.users if u.target is aten.cumsum.default
                and u.args[0] is node and u.args[1] in (1, -1)]
        if val is None or [str(d) for d in val.shape] != seq_shape or not sums:
            continue
        with graph.inserting_before(node):
            real = graph.call_function(aten.ge.Scalar, (raw, 0))
            real = graph.call_function(aten._to_copy.default, (real,), {"dtype": val.dtype})
            for cumsum in sums:
                counted = graph.call_function(aten.add.Tensor, (raw, 1))
                counted = graph.call_function(aten._to_copy.default, (counted,),
                                              {"dtype": cumsum.meta["val"].dtype})
                cumsum.replace_all_uses_with(counted)
        node.replace_all_uses_with(real, delete_user_cb=lambda user, r=real: user is not r)
        count += 1
    return count


def _rows_from(graph: Graph, node: Node, pos: Node, offset: int) -> int:
    """Replace each [1, S] ``unsqueeze(node, 0)`` (through ``+ int`` adds) with ``pos`` plus
    the added offset; returns how many."""
    count = 0
    for user in list(node.users):
        if user.target is aten.add.Tensor and user.args[0] is node \
                and isinstance(user.args[1], int):
            count += _rows_from(graph, user, pos, offset + user.args[1])
        elif user.target is aten.unsqueeze.default and user.args[0] is node \
                and user.args[1] == 0:
            rows = pos
            if offset:
                with graph.inserting_after(pos):
                    rows = graph.call_function(aten.add.Tensor, (pos, offset))
            user.replace_all_uses_with(rows)
            count += 1
    return count


def _mask_keys(graph: Graph, mask: Node, cached_sites: dict) -> dict:
    """Every rewriter::cached_attention -> rewriter::padded_cached_attention reading
    ``mask``; returns ``cached_sites`` under the new node names."""
    renamed, gone = {}, set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not CACHED:
            continue
        with graph.inserting_before(node):
            padded = graph.call_function(PADDED, (*node.args, mask), dict(node.kwargs))
        padded.meta = dict(node.meta)
        node.replace_all_uses_with(padded)
        if node.name in cached_sites:
            renamed[padded.name] = cached_sites[node.name]
        gone.add(node.name)
        graph.erase_node(node)
    return {**{k: v for k, v in cached_sites.items() if k not in gone}, **renamed}


def _drop_static_inputs(graph: Graph) -> None:
    """Export's input guards and the non-tensor inputs (use_cache=False, ...) were fixed at
    capture; the decoder's signature is token ids and the cache."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            if node.users:
                raise DecoderError(f"input {node.name!r} is used by the graph: cannot drop it")
            graph.erase_node(node)


def _propagate_fake(module: GraphModule) -> None:
    """Fresh fake values for every node (the new inputs changed the sequence symbols)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    example = _example_inputs(module)
    FakeTensorProp(module, mode).propagate(*[mode.from_tensor(x) for x in example])


def _example_inputs(module: GraphModule, batch: int = 2, seq: int = 5, past: int = 3,
                    context_len: int = 4) -> list[torch.Tensor]:
    """Inputs in placeholder order: token ids first; a context input (an encoder's output)
    has its example's shape but on its dynamic axes (``meta["rewriter_axes"]``): the batch,
    and ``context_len`` for the encoder's positions."""
    out = []
    batch = _static_batch(module) or batch
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta["val"]
        if i == 0:
            out.append(torch.zeros(batch, seq, dtype=val.dtype))
        elif node.name == "past_length":
            out.append(torch.tensor(past, dtype=torch.long))
        elif node.name == "attention_mask":
            out.append(torch.ones(batch, past + seq, dtype=torch.long))
        elif node.name.startswith(("past_key_", "past_value_")):
            out.append(torch.zeros(batch, int(val.shape[1]), past, int(val.shape[3]),
                                   dtype=val.dtype))
        else:  # context: the example's shape, with its dynamic axes set
            axes = node.meta.get("rewriter_axes", {})
            shape = [{"batch": batch, None: int(d)}.get(axes.get(a), context_len)
                     for a, d in enumerate(val.shape)]
            out.append(torch.ones(shape, dtype=val.dtype))
    return out


def _static_batch(module: GraphModule) -> int | None:
    ids = next(n for n in module.graph.nodes if n.op == "placeholder")
    size = ids.meta["val"].shape[0]
    return None if isinstance(size, torch.SymInt) else int(size)


def _vocab_size(decoder: Decoder) -> int:
    output = next(n for n in decoder.module.graph.nodes if n.op == "output")
    return int(output.args[0][0].meta["val"].shape[-1])


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
