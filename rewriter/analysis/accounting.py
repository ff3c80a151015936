"""Accounting per site and per program: attention density, attention FLOPs at a context
length, and KV-cache bytes per token."""

from __future__ import annotations

from rewriter.ir.masks import MaskSpec, causal_mask
from rewriter.ir.site import AttentionSite


def is_causal_site(site: AttentionSite) -> bool:
    return site.is_causal or "causal" in site.mask


def site_accounting(site: AttentionSite, ctx: int, bytes_per_element: int = 2) -> dict:
    """density: kept fraction of what the model's own mask allows (1.0 = unchanged);
    flops: multiply-adds x2 of q k^T and p v over the kept entries, for one sequence of ``ctx``
    tokens (a neighbourhood mask: its grid's token count instead, the only length it has);
    dense_flops: the same without the sparsity; kv_bytes_per_token: what one more token adds
    to the KV cache (0 when the site reads another site's K/V); kv_bound: per KV head, the
    positions a bounded decoder cache keeps (sink + W - 1; None: every token, rewriter.decoder);
    kv_bytes_at_ctx: the site's cache after ``ctx`` tokens with those bounds."""
    mask = MaskSpec.parse(site.sparsity)
    ctx = mask.tokens or ctx
    causal = is_causal_site(site)
    keep = mask.dense(ctx, ctx, site.num_heads)
    base = causal_mask(ctx, ctx) if causal else keep.new_ones(ctx, ctx)
    kept = float((keep & base).sum()) * (site.num_heads if keep.shape[0] == 1 else 1)
    allowed = float(base.sum()) * site.num_heads
    flops = 2 * kept * (site.head_dim + site.v_head_dim)
    owns_kv = site.kv_source is None
    bounds = mask.kv_head_bounds(site.num_heads, site.num_kv_heads) if causal and not site.cross \
        else [None] * site.num_kv_heads
    per_head = (site.head_dim + site.v_head_dim) * bytes_per_element
    at_ctx = sum(per_head * (ctx if b is None else min(ctx, b)) for b in bounds) if owns_kv else 0
    return {
        "site": site.index,
        "density": kept / allowed,
        "flops": flops,
        "dense_flops": 2 * float(base.sum()) * site.num_heads * (site.head_dim + site.v_head_dim),
        "ctx": ctx,
        "kv_bytes_per_token": site.kv_cache_bytes_per_token(bytes_per_element) if owns_kv else 0,
        "kv_bound": bounds,
        "kv_bytes_at_ctx": at_ctx,
    }


def program_accounting(sites: list[AttentionSite], ctx: int = 1024,
                       bytes_per_element: int = 2) -> dict:
    rows = [site_accounting(s, ctx, bytes_per_element) for s in sites]
    flops = sum(r["flops"] for r in rows)
    dense_flops = sum(r["dense_flops"] for r in rows)
    return {
        "ctx": ctx,
        "bytes_per_element": bytes_per_element,
        "attention_flops": flops,
        "attention_density": flops / dense_flops if dense_flops else 1.0,
        "kv_cache_bytes_per_token": sum(r["kv_bytes_per_token"] for r in rows),
        "kv_cache_bytes_at_ctx": sum(r["kv_bytes_at_ctx"] for r in rows),
        "sites": rows,
    }


def program_facts(program) -> dict:
    """Sites, parameters, KV-cache bytes per token and attention density (at 1024 tokens) of a
    Program: what a conversion's manifest records about the model it started from."""
    acc = program_accounting(program.sites)
    return {"sites": [s.to_dict() for s in program.sites],
            "parameters": program.parameter_count(),
            "kv_cache_bytes_per_token": acc["kv_cache_bytes_per_token"],
            "attention_density_at_1024": acc["attention_density"]}
