"""Decoders with a KV cache: a captured causal LM turned into a step function.

    dec = program.decoder()                    # or rewriter.decoder.build_decoder(program)
    logits, present = dec.step(ids, dec.empty_cache(batch=1))
    tokens = dec.generate(prompt_ids, max_new_tokens=32)    # greedy, with the cache

``dec.module`` is a GraphModule ``forward(input_ids, past_key_0, past_value_0, ...) ->
(logits, present_key_0, present_value_0, ...)``, built from the program's graph by surgery:

1. every canonical ``rewriter::attention`` becomes ``rewriter::cached_attention`` over
   ``cat(past, new)`` with a bottom-right causal mask (the model's own [S, S] mask is dropped:
   only sites whose mask is causal qualify);
2. one cache entry per distinct K (resp. V) tensor: layers that share K/V (share-kv) share it;
3. sequence positions (every ``arange(S)`` of the token axis: rotary and learned position
   embeddings alike) start at the past length P instead of 0, as Hugging Face's cache_position.

Shape glossary: B batch, S new tokens, P cached tokens, Hkv KV heads of a cache entry, D head
dim. Cache entries are [B, Hkv, P, D]. Built decoders are checked against the full program
(prefill + one step == one forward over the whole sequence) before they are returned.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import CodeGen, Graph, GraphModule, Node
from torch.utils._pytree import tree_leaves

from rewriter.analysis.quality import logits_fn
from rewriter.errors import RewriterError
from rewriter.ir.graph import canonical_nodes, cleanup, copy_graph
from rewriter.ir.ops import attention as _attention_op  # noqa: F401  (registers the ops)
from rewriter.ir.precision import EXACT_TOLERANCE, float64_module
from rewriter.ir.topk import is_topk

__all__ = ["CacheEntry", "Decoder", "DecoderError", "build_decoder", "greedy_reference"]

aten = torch.ops.aten
CACHED = torch.ops.rewriter.cached_attention.default
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

    @property
    def static_batch(self) -> int | None:
        """The batch size when the capture fixed it (torch.export pins a size-1 batch)."""
        return _static_batch(self.module)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *(e.input_name for e in self.cache)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(e.output_name for e in self.cache)]

    def example_inputs(self, batch: int = 2, seq: int = 5, past: int = 3
                       ) -> list[torch.Tensor]:
        """Inputs in the step's order: token ids [B, S], zero past tensors [B, Hkv, P, D]."""
        return _example_inputs(self.module, batch, seq, past)

    def empty_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zero-length past tensors [B, Hkv, 0, D], one per cache entry."""
        dtype = dtype or _param_dtype(self.module)
        return [torch.zeros(batch, e.heads, 0, e.head_dim, dtype=dtype) for e in self.cache]

    def step(self, input_ids: torch.Tensor, past: list[torch.Tensor]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, S, V], present cache) for S new tokens after ``past``."""
        with torch.no_grad():
            logits, *present = self.module(input_ids, *past)
        return logits, present

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: the prompt [B, S] followed by ``max_new_tokens`` tokens."""
        token, past, out = input_ids, self.empty_cache(input_ids.shape[0]), [input_ids]
        for _ in range(max_new_tokens):
            logits, past = self.step(token, past)
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)


def greedy_reference(program, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: one full forward of ``program`` per new token."""
    ids, logits_of = input_ids, logits_fn(program)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = logits_of(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def build_decoder(program, *, check: bool = True) -> Decoder:
    """The program as a decoder step with a KV cache; raises DecoderError when the program is
    not a causal LM of causal self-attention sites, or when the decoder does not reproduce the
    program (``check``: prefill of a prompt plus one step against one full forward)."""
    _check_sites(program)
    graph = copy_graph(program.module)
    ids = _token_input(graph)
    canonical = list(canonical_nodes(graph).values())
    if not canonical:
        raise DecoderError("the program has no rewriter::attention nodes (compiled for a "
                           "backend?): build the decoder from the program before compile()")
    sites = {s.node: s for s in program.sites}
    pasts, past_len = _add_cache_inputs(graph, ids, canonical, sites)
    if not _shift_positions(graph, ids, past_len):
        raise DecoderError("no arange over the token axis found: cannot tell where the model "
                           "computes positions, so cached decoding would restart them at 0")
    presents, cached_sites = _attend_over_cache(graph, canonical, pasts, sites)
    cache = _set_outputs(graph, pasts, presents)
    _drop_static_inputs(graph)
    graph.set_codegen(CodeGen())  # a plain forward(input_ids, past_key_0, ...) signature
    module = GraphModule(program.module, graph, class_name="Decoder")
    cleanup(module)
    _propagate_fake(module)
    decoder = Decoder(module, cache, program, cached_sites)
    if check:
        decoder.verify_error = check_decoder(decoder)
    return decoder


def _add_cache_inputs(graph: Graph, ids: Node, canonical: list[Node], sites: dict
                      ) -> tuple[dict[Node, tuple[Node, CacheEntry]], Node]:
    """A past_<kind>_<n> placeholder per distinct K/V node, in first-use order; returns
    {K/V node: (placeholder, entry)} and a node holding P (the past length)."""
    readers: dict[tuple[str, Node], list[int]] = {}  # first-use order (dicts keep it)
    for node in canonical:
        site = sites.get(node.name)
        for kind, source in (("key", node.args[1]), ("value", node.args[2])):
            readers.setdefault((kind, source), []).append(-1 if site is None else site.index)
    pasts: dict[Node, tuple[Node, CacheEntry]] = {}
    counts = {"key": 0, "value": 0}
    last = ids
    for (kind, source), read_by in readers.items():
        if source in pasts:  # one tensor read as both key and value
            continue
        shape = source.meta["val"].shape  # [B, Hkv, S, D]
        entry = CacheEntry(kind, counts[kind], int(shape[1]), int(shape[3]), tuple(read_by))
        counts[kind] += 1
        with graph.inserting_after(last):
            last = graph.placeholder(entry.input_name)
        last.meta["val"] = source.meta["val"]  # rank and dtype; re-derived at the end
        pasts[source] = (last, entry)
    first_past = next(iter(pasts.values()))[0]
    with graph.inserting_after(last):
        past_len = graph.call_function(aten.sym_size.int, (first_past, 2))
    return pasts, past_len


def _attend_over_cache(graph: Graph, canonical: list[Node], pasts: dict, sites: dict
                       ) -> tuple[dict[Node, Node], dict[str, object]]:
    """Each canonical node -> cached_attention; returns {K/V node: its present} (from the
    first site reading it) and {cached node name: site}."""
    presents: dict[Node, Node] = {}
    cached_sites: dict[str, object] = {}
    for node in canonical:
        q, k, v = node.args[:3]
        kw = node.kwargs
        with graph.inserting_before(node):
            cached = graph.call_function(
                CACHED, (q, k, v, pasts[k][0], pasts[v][0]),
                {"scale": kw["scale"], "sparsity": kw.get("sparsity", ""),
                 "softcap": kw.get("softcap", 0.0)})
            out = graph.call_function(operator.getitem, (cached, 0))
            for i, source in ((1, k), (2, v)):
                if source not in presents:
                    presents[source] = graph.call_function(operator.getitem, (cached, i))
        out.meta = dict(node.meta)
        if node.name in sites:
            cached_sites[cached.name] = sites[node.name]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return presents, cached_sites


def _set_outputs(graph: Graph, pasts: dict, presents: dict) -> list[CacheEntry]:
    """Outputs: logits (the model's first output), then the presents in cache order
    (key_0, value_0, key_1, ...); returns the cache entries in that order."""
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = [x for x in tree_leaves(output.args[0]) if isinstance(x, Node)]
    if not leaves:
        raise DecoderError("the program has no tensor output to take logits from")
    order = sorted(pasts, key=lambda src: (pasts[src][1].index, pasts[src][1].kind != "key"))
    graph.erase_node(output)
    graph.output((leaves[0], *(presents[src] for src in order)))
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
    with torch.no_grad():
        want = logits_fn(program, float64_module(program.module, shared))(ids)
        if dynamic:
            got, *_ = step(ids, *decoder.empty_cache(batch, torch.float64))
        else:
            first, *past = step(ids[:, :-1], *decoder.empty_cache(batch, torch.float64))
            last, *_ = step(ids[:, -1:], *past)
            got = torch.cat([first, last], dim=1)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not err <= tolerance:
        raise DecoderError(f"the decoder does not reproduce the program (prefill + step vs one "
                           f"forward in float64: max relative error {err:.2e} > {tolerance:g}); "
                           "the model computes positions or masks in a way the cache surgery "
                           "misses")
    return err


# --- graph surgery helpers -----------------------------------------------------------------

def _check_sites(program) -> None:
    if not program.sites:
        raise DecoderError("the program has no attention sites")
    for s in program.sites:
        if s.cross:
            raise DecoderError(f"site {s.index} ({s.module_path or 'attention'}) is cross "
                               "attention: a decoder cache covers causal self-attention only")
        if s.mask not in _CAUSAL_MASKS:
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


def _shift_positions(graph: Graph, ids: Node, past_len: Node) -> int:
    """Add P to every arange over the token axis (arange(S) or arange(0, S)); returns how many."""
    seq = str(ids.meta["val"].shape[1])
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGE:
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


def _example_inputs(module: GraphModule, batch: int = 2, seq: int = 5, past: int = 3
                    ) -> list[torch.Tensor]:
    out = []
    batch = _static_batch(module) or batch
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        if node.name == "input_ids":
            out.append(torch.zeros(batch, seq, dtype=val.dtype))
        else:
            out.append(torch.zeros(batch, int(val.shape[1]), past, int(val.shape[3]),
                                   dtype=val.dtype))
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
