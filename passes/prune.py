"""``prune-heads``: remove query heads, slicing weights (not zeroing them).

    prune-heads:ratio=R[,score=magnitude|gradient|activation]   (default: gradient for
                                                                 language models, else activation)
    prune-heads:heads=S.H;S.H...      explicit heads: site S (the # column of `inspect`), head H
    [,compensate=bias|none]           fold the pruned heads' mean output into o_proj's bias
                                      (FLAP); default bias with a data score, none otherwise

Heads are ranked globally. The unit removed is a query head in multi-head attention and a
whole KV group (its KV head and the query heads reading it) under GQA, so every query head
left still has its KV head and groups stay uniform. Every site keeps at least one unit.

Scores (higher = more important):
  magnitude   ||W_q[h]|| * ||W_o[:, h]||, no data
  activation  mean L1 norm of the head's contribution through o_proj (as AMP)
  gradient    |dL/dg_h| of a gate g_h = 1 on the head's output, summed over calibration batches
              with the language-model loss (Michel et al. 2019)
"""

from __future__ import annotations

import math

import torch

from rewriter.analysis.quality import is_language_model
from rewriter.errors import SpecError
from rewriter.ir.graph import cleanup
from rewriter.ir.specs import Key, Spec, choice
from rewriter.passes.base import PassContext, PassResult
from rewriter.passes.heads import OutWeights, rebuild_site, site_heads
from rewriter.passes.observe import calibrate, default_output, instrumented, observing
from rewriter.passes.parallel import all_sum, shard
from rewriter.passes.registry import variant


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise ValueError
    return value


def _head_list(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in text.split(";"):
        site, _, head = item.partition(".")
        out.append((int(site), int(head)))
    if not out or min(min(p) for p in out) < 0:
        raise ValueError
    return tuple(sorted(set(out)))


KEYS = {
    "ratio": Key(_ratio, "a fraction in (0, 1)", metavar="R"),
    # default (None): gradient for language models, activation for other models
    "score": Key(choice("magnitude", "gradient", "activation"),
                 "magnitude, gradient or activation; by default gradient for language models, "
                 "activation for others", metavar="magnitude|gradient|activation"),
    "heads": Key(_head_list, "site.head pairs like 0.3;5.1", metavar="S.H;S.H..."),
    "compensate": Key(choice("bias", "none"), "bias or none", metavar="bias|none"),
}


@variant("prune-heads", KEYS,
         "removes the least important query heads (whole KV groups under GQA), slicing "
         "q/k/v/o; without `score=`, `gradient` for language models and `activation` for "
         "other models (the manifest records which)",
         usage=("prune-heads:ratio=R[,score=magnitude|gradient|activation]"
                "[,compensate=bias|none]",
                "prune-heads:heads=S.H;...[,compensate=bias|none]"))
class PrunePass:
    name = "prune-heads"

    def __init__(self, spec: Spec):
        self.spec = spec
        p = spec.params
        if (p["ratio"] is None) == (p["heads"] is None):
            raise SpecError(f"spec {spec}: give exactly one of ratio=R or heads=S.H;...")

    def run(self, program, ctx: PassContext) -> PassResult:
        program = program.clone()
        by_index = {s.index: s for s in program.sites}
        score = None
        if self.spec.params["heads"] is not None:
            remove = self._explicit(by_index)
        else:
            score = self.spec.params["score"] or default_score(program)
            remove = self._ranked(program, ctx, score)
        compensate = self.spec.params["compensate"] or \
            ("bias" if score in ("activation", "gradient") else "none")
        means = mean_head_outputs(program, ctx, {i for i, h in remove.items() if h}) \
            if compensate == "bias" else {}
        total_before = sum(s.num_heads for s in program.sites)
        for index, heads in sorted(remove.items()):
            site = by_index[index]
            keep = [h for h in range(site.num_heads) if h not in heads]
            kv_keep = sorted({h // site.kv_group for h in keep})
            w = site_heads(program.module, site)
            out = w["o"].select(keep)
            if index in means and heads:
                out = compensated(w["o"], sorted(heads), means[index], out)
            rebuild_site(program, site, {
                "q": w["q"].select(keep), "o": out,
                "k": w["k"].select(kv_keep), "v": w["v"].select(kv_keep)}, query_heads=keep)
        cleanup(program.module)  # old projections read parameters that now have new shapes
        removed = {i: sorted(h) for i, h in remove.items() if h}
        return PassResult(program, bool(removed), {
            "heads_removed": sum(len(h) for h in removed.values()),
            "heads_before": total_before, "removed": removed,
            "score": score, "compensate": compensate})

    def _explicit(self, sites: dict) -> dict[int, set[int]]:
        remove: dict[int, set[int]] = {}
        for index, head in self.spec.params["heads"]:
            site = sites.get(index)
            if site is None or head >= site.num_heads:
                raise SpecError(f"spec {self.spec}: no head {index}.{head} (sites 0-"
                                f"{len(sites) - 1}; see the # and Hq columns of inspect)")
            remove.setdefault(index, set()).add(head)
        for index, heads in remove.items():
            site = sites[index]
            groups = {h // site.kv_group for h in heads}
            whole = {g * site.kv_group + i for g in groups for i in range(site.kv_group)}
            if heads != whole:
                raise SpecError(f"spec {self.spec}: site {index} is GQA ({site.kv_group} query "
                                f"heads per KV head): remove whole groups, e.g. "
                                f"{';'.join(f'{index}.{h}' for h in sorted(whole))}")
            if len(heads) == site.num_heads:
                raise SpecError(f"spec {self.spec}: site {index} would have no heads left")
        return remove

    def _ranked(self, program, ctx: PassContext, score: str) -> dict[int, set[int]]:
        scores = SCORES[score](program, ctx)
        units = []  # (score, site, query heads of the unit)
        for site in program.sites:
            g = site.kv_group
            for kv in range(site.num_kv_heads):
                heads = list(range(kv * g, (kv + 1) * g))
                units.append((float(scores[site.index][heads].sum()), site.index, heads))
        total = sum(s.num_heads for s in program.sites)
        target = math.floor(self.spec.params["ratio"] * total + 0.5)
        left = {s.index: s.num_kv_heads for s in program.sites}
        remove: dict[int, set[int]] = {}
        removed = 0
        for _, index, heads in sorted(units, key=lambda u: u[0]):
            if removed >= target:
                break
            if left[index] == 1:
                continue  # keep at least one unit per site
            if removed + len(heads) > target and removed + len(heads) - target > target - removed:
                continue  # overshooting more than stopping short
            remove.setdefault(index, set()).update(heads)
            left[index] -= 1
            removed += len(heads)
        return remove


def mean_head_outputs(program, ctx: PassContext, wanted: set[int]) -> dict[int, torch.Tensor]:
    """Per site in ``wanted``: each head's attention output averaged over the calibration
    tokens, [H, Dv]."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def observer(site, q, k, v, attn_mask, attrs):
        out = default_output(q, k, v, attn_mask, attrs)
        if site in wanted:
            sums[site] = sums.get(site, 0) + out.double().sum(dim=(0, 2))
            counts[site] = counts.get(site, 0) + out.shape[0] * out.shape[2]
        return out

    calibrate(program, ctx, observer, "prune-heads: mean head outputs", data_parallel=True)
    all_sum(sums, counts)
    return {i: sums[i] / counts[i] for i in sums}


def compensated(o: OutWeights, removed: list[int], means: torch.Tensor,
                kept: OutWeights) -> OutWeights:
    """``kept`` with the removed heads' mean contribution W_o[:, h] @ mean_h added to the bias
    (FLAP's bias compensation): the pruned layer's output keeps its average."""
    contribution = torch.einsum("ehd,hd->e", o.weight[:, removed].double(), means[removed])
    bias = contribution if o.bias is None else o.bias.double() + contribution
    return OutWeights(kept.weight, bias.to(o.weight.dtype))


# --- scores: site index -> [H] importance ---------------------------------------------------


def default_score(program) -> str:
    """The best score that applies: the language-model loss's gradient needs next-token
    logits; any other model is ranked by its heads' activations."""
    return "gradient" if is_language_model(program) else "activation"


def magnitude_scores(program, ctx: PassContext) -> dict[int, torch.Tensor]:
    out = {}
    for site in program.sites:
        w = site_heads(program.module, site)
        q = w["q"].weight.flatten(1).norm(dim=1)
        o = w["o"].weight.permute(1, 0, 2).flatten(1).norm(dim=1)
        out[site.index] = (q * o).double()
    return out


def activation_scores(program, ctx: PassContext) -> dict[int, torch.Tensor]:
    o_weights = {s.index: site_heads(program.module, s)["o"].weight for s in program.sites}
    totals: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}

    def observer(site, q, k, v, attn_mask, attrs):
        out = default_output(q, k, v, attn_mask, attrs)
        if site in o_weights:
            # contribution of head h: W_o[:, h] @ out[b, h, s]  -> [B, H, S, E]
            contrib = torch.einsum("ehd,bhsd->bhse", o_weights[site].float(), out.float())
            totals[site] = totals.get(site, 0) + contrib.abs().sum(-1).sum(dim=(0, 2)).double()
            tokens[site] = tokens.get(site, 0) + out.shape[0] * out.shape[2]
        return out

    calibrate(program, ctx, observer, "prune-heads: activation scores", data_parallel=True)
    all_sum(totals, tokens)
    return {i: totals[i] / tokens[i] for i in totals}


def gradient_scores(program, ctx: PassContext) -> dict[int, torch.Tensor]:
    gates = {s.index: torch.ones(s.num_heads, requires_grad=True) for s in program.sites}
    totals = {i: torch.zeros(len(g), dtype=torch.float64) for i, g in gates.items()}

    def observer(site, q, k, v, attn_mask, attrs):
        out = default_output(q, k, v, attn_mask, attrs)  # the canonical op has gradients
        return out * gates[site].view(1, -1, 1, 1).to(out.dtype)

    module = instrumented(program)
    batches = shard(ctx.batches(program))  # under torchrun: this process's share
    with torch.enable_grad(), observing(observer):
        for i, (args, kwargs) in enumerate(batches):
            ids = args[0] if args else kwargs.get("input_ids")
            out = module(*args, **kwargs)
            logits = getattr(out, "logits", None)
            if logits is None or ids is None:
                raise SpecError("score=gradient needs a language model (logits and token ids); "
                                "use score=activation")
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            # autograd.grad, not backward(): no .grad lands on the (shared) model weights
            grads = torch.autograd.grad(loss, list(gates.values()))
            for index, grad in zip(gates, grads, strict=True):
                totals[index] += grad.abs().double()
            ctx.report("prune-heads: gradient scores", i + 1, len(batches))
    all_sum(totals)
    return totals


SCORES = {"magnitude": magnitude_scores, "activation": activation_scores,
          "gradient": gradient_scores}
