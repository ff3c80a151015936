"""``sparse``: static sparse masks on canonical sites.

    sparse:window=W[,sink=S][,dilation=D][,layers=L][,heads=H]
        every self-attention site (or those of layers L, e.g. ``0-3;8``) gets
        sink+window(+dilation) (cross attention stays as it is: its keys are another
        sequence); with
        heads=H only those query heads (e.g. ``0;4``) do, the others keep full attention.
    sparse:heads=auto,density=P[,window=W][,sink=S][,ctx=N]
        per KV head, a calibrated choice between full attention and sink+window (window W,
        or by default a window per head from 64..512), so that the whole model computes a
        fraction P of the causal score matrix at context N while changing the heads' outputs
        (through o_proj) least on calibration text (DuoAttention / MoA, without training).
    sparse:topk=K[,block=B][,sink=S][,local=W][,estimate=mean|channels:C]
        dynamic, training-free (Quest / Double Sparsity / FlexPrefill): per query block of B
        tokens (default 64) and KV head, the sink (default 4), the local band (default B)
        and the K key blocks a cheap estimate ranks highest (rewriter.ir.topk); on every
        causal self-attention site.
    sparse:neighborhood=K[,dilation=D][,grid=HxW|TxHxW][,global=N][,layers=L]
        neighbourhood attention on a vision token grid (NATTEN's definition, rewriter.ir.masks):
        each grid token reads the KxK (KxKxK) grid tokens around it and the N global tokens;
        the grid comes from the patch embedding unless given (passes/neighborhood.py).
"""

from __future__ import annotations

import torch

from rewriter.errors import SpecError
from rewriter.ir.graph import canonical_nodes
from rewriter.ir.masks import MaskSpec, causal_mask, head_table
from rewriter.ir.ops import reference_probs
from rewriter.ir.specs import (
    Key,
    Spec,
    fraction,
    grid_shape,
    int_set,
    non_negative_int,
    positive_int,
)
from rewriter.ir.topk import TopKSpec
from rewriter.passes.base import PassContext, PassResult
from rewriter.passes.heads import site_heads
from rewriter.passes.neighborhood import neighborhood_masks
from rewriter.passes.observe import calibrate, default_output
from rewriter.passes.parallel import all_sum
from rewriter.passes.registry import variant


def _and_existing(mask: MaskSpec, site, spec) -> MaskSpec:
    """``mask`` ANDed with the model's own sliding window where the site has one (found at
    capture: rewriter.patterns.native_window), as one spec; an earlier sparse variant's mask
    is replaced, as before."""
    if site.model_window is None:
        return mask
    try:
        return mask.within(site.model_window)
    except SpecError as why:
        raise SpecError(f"spec {spec}: site {site.index}: {why}") from None


def _estimate(text: str) -> str:
    TopKSpec(1, estimate=text)  # raises SpecError with the reason
    return text


KEYS = {
    "window": Key(positive_int, "a positive integer (tokens)", metavar="W"),
    "sink": Key(non_negative_int, "an integer >= 0 (tokens)", default=None, metavar="S"),
    "dilation": Key(positive_int, "a positive integer", default=1, metavar="D"),
    "layers": Key(int_set, "layer indices like 0;2;5-7", default=None, metavar="L"),
    "heads": Key(lambda t: "auto" if t == "auto" else int_set(t),
                 "auto, or query-head indices like 0;3", default=None, metavar="H"),
    "density": Key(fraction, "a fraction in (0, 1]", default=None, metavar="P"),
    "ctx": Key(positive_int, "the context length the density is measured at", default=1024,
               metavar="N"),
    "topk": Key(positive_int, "a positive integer (key blocks per query block)", metavar="K"),
    "block": Key(positive_int, "a positive integer (tokens per block)", default=None,
                 metavar="B"),
    "local": Key(non_negative_int, "an integer >= 0 (tokens)", default=None, metavar="W"),
    "estimate": Key(_estimate, "mean or channels:C", default="mean",
                    metavar="mean|channels:C"),
    "neighborhood": Key(positive_int, "an odd positive integer (kernel size per axis)",
                        metavar="K"),
    "grid": Key(grid_shape, "HxW or TxHxW (grid tokens per axis)", metavar="HxW|TxHxW"),
    "global": Key(non_negative_int, "an integer >= 0 (tokens before the grid)",
                  metavar="N"),
}

AUTO_WINDOW, AUTO_SINK = 64, 4
TOPK_BLOCK = 64  # default block size; the local band defaults to one block
TOPK_ONLY = ("topk", "block", "local", "estimate")
WINDOW_CHOICES = (64, 96, 128, 192, 256, 384, 512)


@variant("sparse", KEYS,
         "static sink + window masks on every site or a subset; with `heads=auto`, a calibrated "
         "window (or full attention) per KV head, at most a fraction P of the causal score "
         "matrix at N tokens; with `topk=K`, per query block of B tokens and KV head the sink, "
         "the local band and the K key blocks a cheap estimate ranks highest (dynamic, "
         "training-free); with `neighborhood=K`, NATTEN's KxK (KxKxK) neighbourhoods on a "
         "vision token grid read from the patch embedding, plus the global (CLS) tokens",
         usage=("sparse:window=W[,sink=S][,dilation=D][,layers=L][,heads=H]",
                "sparse:heads=auto,density=P[,ctx=N]",
                "sparse:topk=K[,block=B][,sink=S][,local=W][,estimate=mean|channels:C]",
                "sparse:neighborhood=K[,dilation=D][,grid=HxW|TxHxW][,global=N]"))
class SparsePass:
    name = "sparse"

    def __init__(self, spec: Spec):
        self.spec = spec
        p = spec.params
        if p["neighborhood"] is not None or p["grid"] is not None or p["global"] is not None:
            self._check_neighborhood()
            return
        given = [k for k in TOPK_ONLY[1:] if p[k] not in (None, KEYS[k].default)]
        if p["topk"] is not None:
            others = [k for k in ("window", "dilation", "layers", "heads", "density")
                      if p[k] not in (None, KEYS[k].default)]
            if others:
                raise SpecError(f"spec {spec}: topk= does not take {others[0]}=")
            return
        if given:
            raise SpecError(f"spec {spec}: {given[0]}= only goes with topk=K")
        if p["heads"] == "auto":
            if p["density"] is None:
                raise SpecError(f"spec {spec}: heads=auto needs density=P (a fraction in (0, 1])")
            if p["dilation"] != 1:
                raise SpecError(f"spec {spec}: heads=auto does not take dilation")
        else:
            if p["window"] is None:
                raise SpecError(f"spec {spec}: sparse needs window=W (or heads=auto,density=P, "
                                "topk=K or neighborhood=K)")
            if p["density"] is not None:
                raise SpecError(f"spec {spec}: density= only goes with heads=auto")

    def run(self, program, ctx: PassContext) -> PassResult:
        program = program.clone()
        p = self.spec.params
        if p["topk"] is not None:
            return self._topk(program)
        if p["heads"] == "auto":
            tables = self._auto_tables(program, ctx)
        elif p["neighborhood"] is not None:
            tables = neighborhood_masks(program, self.spec)
        else:
            tables = {}
            for site in program.sites:
                if p["layers"] is not None and site.layer not in p["layers"]:
                    continue
                if site.cross:  # windows and sinks are positions of one sequence
                    continue
                heads = None
                if p["heads"] is not None:
                    bad = [h for h in p["heads"] if h >= site.num_heads]
                    if bad:
                        raise SpecError(f"spec {self.spec}: heads={bad} out of range for "
                                        f"site {site.index} ({site.num_heads} heads)")
                    heads = "".join("s" if h in p["heads"] else "f"
                                    for h in range(site.num_heads))
                tables[site.index] = MaskSpec(p["window"], p["sink"] or 0, p["dilation"], heads)
        nodes = canonical_nodes(program.module)
        for site in program.sites:
            mask = tables.get(site.index)
            if mask is None or mask.is_dense:
                continue
            mask = _and_existing(mask, site, self.spec)
            node = nodes[site.node]
            node.kwargs = {**node.kwargs, "sparsity": mask.format()}
            site.sparsity = mask.format()
        program.module.recompile()
        changed = [s.index for s in program.sites if s.index in tables]
        counts = {"sites": len(changed)}
        if p["heads"] == "auto":
            counts["full_heads"] = sum(int((t.head_windows(s.num_heads) == 0).sum())
                                       for s in program.sites
                                       if (t := tables.get(s.index)) is not None)
            counts["density_at_ctx"] = self._density(program, tables, p["ctx"])
        return PassResult(program, bool(changed), counts)

    def _check_neighborhood(self) -> None:
        spec, p = self.spec, self.spec.params
        if p["neighborhood"] is None:
            raise SpecError(f"spec {spec}: grid= and global= only go with neighborhood=K")
        if p["neighborhood"] % 2 == 0:
            raise SpecError(f"spec {spec}: neighborhood={p['neighborhood']} is not allowed "
                            "(an odd positive integer: the kernel size per axis)")
        others = [k for k in ("window", "sink", "heads", "density", "ctx", *TOPK_ONLY)
                  if p[k] not in (None, KEYS[k].default)]
        if others:
            raise SpecError(f"spec {spec}: neighborhood= does not take {others[0]}=")

    # --- topk ----------------------------------------------------------------------------

    def _topk(self, program) -> PassResult:
        """Dynamic top-k block selection (rewriter.ir.topk) on every causal self-attention."""
        p = self.spec.params
        block = p["block"] or TOPK_BLOCK
        spec = TopKSpec(p["topk"], block, AUTO_SINK if p["sink"] is None else p["sink"],
                        block if p["local"] is None else p["local"], p["estimate"])
        nodes = canonical_nodes(program.module)
        changed = []
        for site in program.sites:
            if site.cross or not (site.is_causal or site.mask.startswith("causal")):
                continue
            if site.sparsity:
                raise SpecError(f"spec {self.spec}: site {site.index} already has a sparsity "
                                f"pattern ({site.sparsity}): topk replaces none")
            node = nodes[site.node]
            node.kwargs = {**node.kwargs, "sparsity": spec.format()}
            site.sparsity = spec.format()
            changed.append(site.index)
        if not changed:
            raise SpecError(f"spec {self.spec}: topk serves causal self-attention and the "
                            "program has none")
        program.module.recompile()
        blocks = spec.sink // block + spec.local // block + spec.topk + 1
        return PassResult(program, True, {"sites": len(changed), "topk": spec.format(),
                                          "max_blocks_per_query_block": blocks})

    # --- heads=auto ---------------------------------------------------------------------

    def _auto_tables(self, program, ctx: PassContext) -> dict[int, MaskSpec]:
        """Per KV head: full attention or sink+window with a window from WINDOW_CHOICES (or
        only the given window), minimizing the error masking puts on the heads' outputs on
        calibration text at the requested density: a Lagrangian relaxation, bisected on the
        price of density."""
        p = self.spec.params
        sink = AUTO_SINK if p["sink"] is None else p["sink"]
        length = p["ctx"]
        windows = [p["window"]] if p["window"] else [w for w in WINDOW_CHOICES if w < length]
        if not windows:
            raise SpecError(f"sparse:heads=auto at ctx={length}: no window choice is shorter "
                            f"than the context (the smallest is {min(WINDOW_CHOICES)}); pass "
                            "window=W or a larger ctx=")
        patterns = [MaskSpec(w, sink) for w in windows]
        o_weights = {}
        for site in program.sites:
            if site.o_proj is not None:
                o_weights[site.index] = site_heads(program.module, site)["o"].weight.float()
        # site -> [options, Hq]: the error each option puts on the head's contribution to the
        # residual stream (through o_proj), relative to the whole site's output energy.
        errors: dict[int, torch.Tensor] = {}

        def observer(site, q, k, v, attn_mask, attrs):
            probs = reference_probs(q, k, attn_mask, scale=attrs["scale"],
                                    is_causal=attrs["is_causal"], sparsity=attrs["sparsity"],
                                    softcap=attrs["softcap"])
            group = q.shape[1] // v.shape[1]
            vv = v.float().repeat_interleave(group, dim=1)
            full = probs @ vv  # [B, H, Sq, Dv]
            w_o = o_weights.get(site)
            contrib = (lambda x: torch.einsum("ehd,bhsd->bhse", w_o, x)) if w_o is not None \
                else (lambda x: x)
            energy = float((contrib(full).sum(1) ** 2).sum()) + 1e-30
            sq, sk = q.shape[-2], k.shape[-2]
            errs = []
            for m in patterns:
                kept = probs * m.dense(sq, sk).to(probs.device)
                # renormalize as the masked softmax does
                kept = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
                diff = contrib(kept @ vv - full)
                errs.append((diff ** 2).sum(dim=(0, 2, 3)) / energy)  # [H]
            errors[site] = errors.get(site, 0) + torch.stack(errs).double()
            return default_output(q, k, v, attn_mask, attrs)

        n_batches = calibrate(program, ctx, observer, "sparse heads=auto: masking error",
                              data_parallel=True)
        counts = {"batches": n_batches}
        all_sum(errors, counts)
        n_batches = counts["batches"]
        # options per KV head: 0 = full (loses nothing, density 1), i+1 = windows[i]
        density = torch.tensor([1.0] + [m.density(length, length, causal=True)
                                         for m in patterns])
        groups, losses, weights = [], [], []
        for site in program.sites:
            err = errors[site.index] / n_batches  # [options, Hq]
            per_kv = err.view(len(patterns), site.num_kv_heads, site.kv_group).sum(-1)
            for g in range(site.num_kv_heads):
                groups.append((site.index, g))
                losses.append(torch.cat([torch.zeros(1, dtype=torch.float64), per_kv[:, g]]))
                weights.append(site.kv_group * site.head_dim)
        loss = torch.stack(losses)  # [groups, options]
        weight = torch.tensor(weights, dtype=torch.float64)

        def choose(price: float) -> torch.Tensor:
            return (loss + price * density).argmin(dim=1)

        def overall(choice: torch.Tensor) -> float:
            return float((weight * density[choice].double()).sum() / weight.sum())

        lo, hi = 0.0, 1e4  # price of density: 0 keeps everything full
        if overall(choose(hi)) > p["density"]:
            choice = choose(hi)  # even the cheapest options exceed the budget
        else:
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if overall(choose(mid)) > p["density"] else (lo, mid)
            choice = choose(hi)
        picked = {grp: int(c) for grp, c in zip(groups, choice, strict=True)}
        tables = {}
        base = windows[0] if len(windows) == 1 else AUTO_WINDOW
        for site in program.sites:
            entries = [None if picked[(site.index, h // site.kv_group)] == 0
                       else windows[picked[(site.index, h // site.kv_group)] - 1]
                       for h in range(site.num_heads)]
            tables[site.index] = MaskSpec(base, sink, 1, head_table(entries, base))
        return tables

    @staticmethod
    def _density(program, tables, length: int) -> float:
        base = causal_mask(length, length)
        kept = total = 0.0
        for site in program.sites:
            mask = tables.get(site.index, MaskSpec())
            keep = mask.dense(length, length, site.num_heads) & base
            kept += float(keep.sum()) * (site.num_heads if keep.shape[0] == 1 else 1)
            total += float(base.sum()) * site.num_heads
        return kept / total
