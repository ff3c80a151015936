"""Differences between two Programs: per-site attention changes and parameter changes.

    from rewriter.analysis.diff import diff_programs
    d = diff_programs(before, after)    # JSON-ready dict
"""

from __future__ import annotations

SITE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "sparsity", "kv_source", "attn_source",
               "mask", "backend")


def _site_key(site) -> tuple:
    return (site.layer, site.module_path) if site.module_path else (site.index,)


def diff_sites(a: list, b: list) -> list[dict]:
    """One row per site present in either program whose fields differ (matched by module
    path and layer, else by index)."""
    left = {_site_key(s): s for s in a}
    right = {_site_key(s): s for s in b}
    rows = []
    for key in sorted(set(left) | set(right), key=lambda k: tuple(str(x) for x in k)):
        s, t = left.get(key), right.get(key)
        name = (s or t).module_path or f"site {(s or t).index}"
        if s is None or t is None:
            rows.append({"site": name, "layer": (s or t).layer,
                         "change": "added" if s is None else "removed"})
            continue
        changes = {f: [getattr(s, f), getattr(t, f)] for f in SITE_FIELDS
                   if getattr(s, f) != getattr(t, f)}
        if changes:
            rows.append({"site": name, "layer": s.layer, "change": "changed",
                         "fields": changes})
    return rows


def diff_parameters(a: dict, b: dict) -> dict:
    """{name: shape} maps -> added, removed, reshaped (with both shapes)."""
    return {
        "added": {n: list(b[n]) for n in sorted(set(b) - set(a))},
        "removed": {n: list(a[n]) for n in sorted(set(a) - set(b))},
        "reshaped": {n: [list(a[n]), list(b[n])] for n in sorted(set(a) & set(b))
                     if tuple(a[n]) != tuple(b[n])},
    }


def parameter_shapes(program) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in program.module.named_parameters(remove_duplicate=False)}


def diff_programs(a, b) -> dict:
    acc_a, acc_b = a.accounting(), b.accounting()
    return {
        "sites": [len(a.sites), len(b.sites)],
        "parameters": [a.parameter_count(), b.parameter_count()],
        "kv_cache_bytes_per_token": [acc_a["kv_cache_bytes_per_token"],
                                     acc_b["kv_cache_bytes_per_token"]],
        "site_changes": diff_sites(a.sites, b.sites),
        "parameter_changes": diff_parameters(parameter_shapes(a), parameter_shapes(b)),
    }
