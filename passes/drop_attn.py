"""``drop-attn``: remove whole attention sublayers, keeping the residual path.

    drop-attn:ratio=R[,score=cosine|gradient]   drop the fraction R of attention sites that
                                                matter least on calibration data
    drop-attn:layers=L                          drop the sites of layers L (e.g. ``3;7;10-12``)

A site's sublayer is its attention plus the output projection, up to the add that puts it into
the residual stream (``h = x + o_proj(attn(...))``). Dropping it replaces that add by its other
operand: the site's projections, its norm when nothing else reads it, and its KV cache entry all
become dead code and go. In a parallel block (``x + attn(ln(x)) + mlp(ln(x))``) the other
operand is the MLP's output, so the sum keeps the MLP.

Scores (higher = more important; the lowest go):
  cosine    1 - cos(x, x + attn(x)) per token on the residual stream, averaged (LLM-Drop /
            "What Matters in Transformers? Not All Attention is Needed", He et al. 2024)
  gradient  |dL/dg| of a gate g = 1 on the sublayer's output with the language-model loss: the
            first-order change of the loss when the sublayer is removed (g -> 0)

Sites that other sites read (share-kv's K/V source, share-attn's map source) are never dropped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from rewriter.errors import SpecError
from rewriter.ir.graph import cleanup, copy_graph, graph_module_over, remove_unused_attributes
from rewriter.ir.specs import Key, Spec, choice, int_set
from rewriter.passes.base import PassContext, PassResult
from rewriter.passes.parallel import all_sum, shard
from rewriter.passes.registry import variant

aten = torch.ops.aten

# ops between the output projection and the residual add that only move or copy the values
_PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.dropout.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.flatten.using_ints, aten.unflatten.int,
}
_ADD = (aten.add.Tensor,)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise ValueError
    return value


KEYS = {
    "ratio": Key(_ratio, "a fraction in (0, 1)", metavar="R"),
    "score": Key(choice("cosine", "gradient"), "cosine (the default) or gradient",
                 metavar="cosine|gradient"),
    "layers": Key(int_set, "layer indices like 3;7;10-12", metavar="L"),
}


@variant("drop-attn", KEYS,
         "removes whole attention sublayers (the residual path stays; their projections and "
         "KV cache go): the fraction R least important by `cosine` (input vs output of the "
         "residual add) or `gradient` scores, or the given layers",
         usage=("drop-attn:ratio=R[,score=cosine|gradient]", "drop-attn:layers=L"))
class DropAttentionPass:
    name = "drop-attn"

    def __init__(self, spec: Spec):
        self.spec = spec
        p = spec.params
        if (p["ratio"] is None) == (p["layers"] is None):
            raise SpecError(f"spec {spec}: give exactly one of ratio=R or layers=L")
        if p["layers"] is not None and p["score"] is not None:
            raise SpecError(f"spec {spec}: score= only goes with ratio=R")

    def run(self, program, ctx: PassContext) -> PassResult:
        program = program.clone()
        sources = {s.kv_source for s in program.sites} | {s.attn_source for s in program.sites}
        droppable = [s for s in program.sites if s.index not in sources]
        adds = {s.index: residual_add(program.module, s) for s in droppable}
        scores = None
        if self.spec.params["layers"] is not None:
            drop = self._explicit(program, sources)
        else:
            score = self.spec.params["score"] or "cosine"
            scores = SCORES[score](program, ctx, adds)
            count = math.floor(self.spec.params["ratio"] * len(program.sites) + 0.5)
            drop = sorted(sorted(scores, key=scores.__getitem__)[:count])
        for index in drop:
            add, branch = adds[index]
            add.replace_all_uses_with(add.args[1 - branch])
            program.module.graph.erase_node(add)
        cleanup(program.module)
        freed = remove_unused_attributes(program.module)
        layers = {s.index: s.layer for s in program.sites}
        cache_before = _cache_bytes(program.sites)
        program.sites = [s for s in program.sites if s.index not in drop]
        counts = {"dropped": drop, "dropped_layers": [layers[i] for i in drop],
                  "sites_before": len(layers), "parameters_freed": freed,
                  "kv_cache_bytes_per_token": [cache_before, _cache_bytes(program.sites)]}
        if scores is not None:
            counts["score"] = self.spec.params["score"] or "cosine"
            counts["scores"] = {i: round(v, 6) for i, v in sorted(scores.items())}
        return PassResult(program, bool(drop), counts)

    def _explicit(self, program, sources: set) -> list[int]:
        wanted = set(self.spec.params["layers"])
        drop = [s.index for s in program.sites
                if (s.layer if s.layer is not None else s.index) in wanted]
        found = {(s.layer if s.layer is not None else s.index) for s in program.sites
                 if s.index in drop}
        if wanted - found:
            have = sorted({s.layer if s.layer is not None else s.index for s in program.sites})
            raise SpecError(f"spec {self.spec}: no attention in layer(s) "
                            f"{sorted(wanted - found)} (layers with attention: {have})")
        shared = [i for i in drop if i in sources]
        if shared:
            raise SpecError(f"spec {self.spec}: site {shared[0]} is read by other sites "
                            "(share-kv / share-attn source): it cannot be dropped")
        if len(drop) == len(program.sites):
            raise SpecError(f"spec {self.spec}: would drop every attention site")
        return drop


def _cache_bytes(sites) -> int:
    return sum(s.kv_cache_bytes_per_token() for s in sites if s.kv_source is None)


# --- the residual add of a site ------------------------------------------------------------


def residual_add(gm: GraphModule, site) -> tuple[Node, int]:
    """The add that puts the site's sublayer output into the residual stream, and which of its
    two arguments is the sublayer's (0 or 1). Walks from the output projection through
    pass-through ops and bias adds (an add of a parameter)."""
    if site.o_proj is None:
        raise SpecError(f"site {site.index} ({site.module_path or 'attention'}) has no output "
                        "projection found: cannot tell where its sublayer ends")
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes[site.o_proj.node]
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise SpecError(f"site {site.index}: the output projection's result is read by "
                            f"{len(users)} nodes before any residual add: cannot drop it alone")
        user = users[0]
        if user.op == "call_function" and user.target in _ADD and len(user.args) == 2:
            branch = 0 if user.args[0] is node else 1
            other = user.args[1 - branch]
            if isinstance(other, Node) and not _constant(other):
                return user, branch
        elif not (user.op == "call_function" and user.target in _PASS_THROUGH):
            raise SpecError(f"site {site.index}: after the output projection comes "
                            f"{user.target} before any residual add: cannot drop it")
        node = user


def _constant(node: Node) -> bool:
    """Computed from parameters/constants only (a bias), not from the model's inputs."""
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return False
    return all(_constant(n) for n in node.all_input_nodes)


# --- scores: site index -> importance ------------------------------------------------------

# (site, branch, residual) -> branch as the graph should use it
Tap = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
_TAPS: list[Tap] = []


def residual_tap(branch, residual, *, site: int):
    return _TAPS[-1](site, branch, residual)


@contextlib.contextmanager
def tapping(fn: Tap) -> Iterator[None]:
    _TAPS.append(fn)
    try:
        yield
    finally:
        _TAPS.pop()


def tapped(program, adds: dict[int, tuple[Node, int]]) -> torch.nn.Module:
    """A copy of the program whose residual adds pass their sublayer's output through the
    current tap."""
    graph = copy_graph(program.module)
    nodes = {n.name: n for n in graph.nodes}
    for index, (add, branch) in adds.items():
        node = nodes[add.name]
        args = list(node.args)
        with graph.inserting_before(node):
            args[branch] = graph.call_function(residual_tap, (args[branch], args[1 - branch]),
                                               {"site": index})
        node.args = tuple(args)
    return graph_module_over(program.module, graph)


def cosine_scores(program, ctx: PassContext, adds) -> dict[int, float]:
    totals = dict.fromkeys(adds, 0.0)
    tokens = dict.fromkeys(adds, 0)

    def tap(site, branch, residual):
        x, y = residual.float(), (residual + branch).float()
        cos = F.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)
        totals[site] += float((1.0 - cos).sum())
        tokens[site] += cos.numel()
        return branch

    module = tapped(program, adds)
    batches = shard(ctx.batches(program))  # under torchrun: this process's share
    with torch.no_grad(), tapping(tap):
        for i, (args, kwargs) in enumerate(batches):
            module(*args, **kwargs)
            ctx.report("drop-attn: cosine scores", i + 1, len(batches))
    all_sum(totals, tokens)
    return {i: totals[i] / max(tokens[i], 1) for i in adds}


def gradient_scores(program, ctx: PassContext, adds) -> dict[int, float]:
    gates = {i: torch.ones((), requires_grad=True) for i in adds}
    totals = dict.fromkeys(adds, 0.0)

    def tap(site, branch, residual):  # noqa: ARG001
        return branch * gates[site].to(branch.dtype)

    module = tapped(program, adds)
    batches = shard(ctx.batches(program))
    with torch.enable_grad(), tapping(tap):
        for i, (args, kwargs) in enumerate(batches):
            ids = args[0] if args else kwargs.get("input_ids")
            logits = getattr(module(*args, **kwargs), "logits", None)
            if logits is None or ids is None:
                raise SpecError("drop-attn score=gradient needs a language model (logits and "
                                "token ids); use score=cosine")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, list(gates.values()))
            for index, grad in zip(gates, grads, strict=True):
                totals[index] += abs(float(grad))
            ctx.report("drop-attn: gradient scores", i + 1, len(batches))
    all_sum(totals)
    return totals


SCORES = {"cosine": cosine_scores, "gradient": gradient_scores}
