"""``sparse``: static sparse masks on canonical sites.

    sparse:window=W[,sink=S][,dilation=D][,layers=L][,heads=H]
        every site (or the layers L, e.g. ``0-3;8``) gets sink+window(+dilation); with
        heads=H only those query heads (e.g. ``0;4``) do, the others keep full attention.
    sparse:heads=auto,density=P[,window=W][,sink=S][,ctx=N]
        per KV head, a calibrated choice between full attention and sink+window, so that the
        whole model computes a fraction P of the causal score matrix at context N. The heads
        that lose the most attention mass to the window keep full context (DuoAttention/MoA
        without training).
"""

from __future__ import annotations

import math

import torch

from rewriter.errors import SpecError
from rewriter.masks import MaskSpec, causal_mask
from rewriter.ops import reference_probs
from rewriter.passes.base import PassContext, PassResult, canonical_nodes, clone_program
from rewriter.passes.observe import calibrate, default_output
from rewriter.specs import Key, Spec, fraction, int_set, non_negative_int, positive_int, register

register("sparse", {
    "window": Key(positive_int, "a positive integer (tokens)"),
    "sink": Key(non_negative_int, "an integer >= 0 (tokens)", default=None),
    "dilation": Key(positive_int, "a positive integer", default=1),
    "layers": Key(int_set, "layer indices like 0;2;5-7", default=None),
    "heads": Key(lambda t: "auto" if t == "auto" else int_set(t),
                 "auto, or query-head indices like 0;3", default=None),
    "density": Key(fraction, "a fraction in (0, 1]", default=None),
    "ctx": Key(positive_int, "the context length the density is measured at", default=1024),
})

AUTO_WINDOW, AUTO_SINK = 64, 4


class SparsePass:
    name = "sparse"

    def __init__(self, spec: Spec):
        self.spec = spec
        p = spec.params
        if p["heads"] == "auto":
            if p["density"] is None:
                raise SpecError(f"spec {spec}: heads=auto needs density=P (a fraction in (0, 1])")
            if p["dilation"] != 1:
                raise SpecError(f"spec {spec}: heads=auto does not take dilation")
        else:
            if p["window"] is None:
                raise SpecError(f"spec {spec}: sparse needs window=W (or heads=auto,density=P)")
            if p["density"] is not None:
                raise SpecError(f"spec {spec}: density= only goes with heads=auto")

    def run(self, program, ctx: PassContext) -> PassResult:
        program = clone_program(program)
        p = self.spec.params
        if p["heads"] == "auto":
            tables = self._auto_tables(program, ctx)
        else:
            tables = {}
            for site in program.sites:
                if p["layers"] is not None and site.layer not in p["layers"]:
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
            node = nodes[site.node]
            node.kwargs = {**node.kwargs, "sparsity": mask.format()}
            site.sparsity = mask.format()
        program.module.recompile()
        changed = [s.index for s in program.sites if s.index in tables]
        counts = {"sites": len(changed)}
        if p["heads"] == "auto":
            counts["full_heads"] = sum(t.heads.count("f") for t in tables.values() if t.heads)
            counts["density_at_ctx"] = self._density(program, tables, p["ctx"])
        return PassResult(program, bool(changed), counts)

    # --- heads=auto ---------------------------------------------------------------------

    def _auto_tables(self, program, ctx: PassContext) -> dict[int, MaskSpec]:
        p = self.spec.params
        window = p["window"] or AUTO_WINDOW
        sink = AUTO_SINK if p["sink"] is None else p["sink"]
        pattern = MaskSpec(window, sink)
        kept_mass: dict[int, torch.Tensor] = {}  # site -> [Hq] mass inside sink+window

        def observer(site, q, k, v, attn_mask, attrs):
            probs = reference_probs(q, k, attn_mask, scale=attrs["scale"],
                                    is_causal=attrs["is_causal"], sparsity=attrs["sparsity"],
                                    softcap=attrs["softcap"])
            keep = pattern.dense(q.shape[-2], k.shape[-2]).to(probs.device)  # [1, Sq, Sk]
            mass = (probs * keep).sum(-1).mean(dim=(0, 2))  # [Hq]
            kept_mass[site] = kept_mass.get(site, 0) + mass
            return default_output(q, k, v, attn_mask, attrs)

        calibrate(program, ctx, observer, "sparse heads=auto: attention mass")
        # Decide per KV head (its query heads share one KV cache stream).
        candidates = []  # (lost mass, site, kv head)
        for site in program.sites:
            mass = kept_mass[site.index] / len(ctx.batches(program))
            lost = 1.0 - mass.view(site.num_kv_heads, site.kv_group).mean(-1)
            candidates += [(float(lost[g]), site.index, g) for g in range(site.num_kv_heads)]
        sparse_density = pattern.density(p["ctx"], p["ctx"], causal=True)
        target = p["density"]
        n = len(candidates)
        # n_full + (n - n_full) * d_s = P * n  ->  n_full = n (P - d_s) / (1 - d_s)
        n_full = n if sparse_density >= 1 else math.ceil(
            max(0.0, target - sparse_density) / (1 - sparse_density) * n)
        full = {(s, g) for _, s, g in sorted(candidates, reverse=True)[:n_full]}
        tables = {}
        for site in program.sites:
            letters = "".join("f" if (site.index, h // site.kv_group) in full else "s"
                              for h in range(site.num_heads))
            tables[site.index] = MaskSpec(window, sink, 1, letters)
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
