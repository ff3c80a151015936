"""Tables of attention sites for people: the summary behind `Program.summary()` and
`rewriter inspect`."""

from __future__ import annotations

from rewriter.ir.site import AttentionSite


def sites_table(sites: list[AttentionSite], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for col in ("#", "layer", "module", "pattern", "Hq", "Hkv", "D", "positional", "mask",
                "scale", "variant", "backend"):
        table.add_column(col, justify="right" if col in ("#", "layer", "Hq", "Hkv", "D")
                         else "left")
    for s in sites:
        pattern = s.pattern + (f" +{s.kv_expansion}" if s.kv_expansion != "none" else "")
        mask = s.mask + (f" softcap={s.softcap:g}" if s.softcap else "") + \
            (" cross" if s.cross else "")
        table.add_row(str(s.index), "" if s.layer is None else str(s.layer), s.module_path,
                      pattern, str(s.num_heads), str(s.num_kv_heads), str(s.head_dim),
                      s.positional, mask, f"{s.scale:.4g}", variant_label(s), backend_label(s))
    return table


def variant_label(site: AttentionSite) -> str:
    parts = []
    if site.sparsity:
        parts.append(site.sparsity)
    if site.kv_source is not None:
        parts.append(f"kv<-{site.kv_source}")
    if site.attn_source is not None:
        parts.append(f"attn<-{site.attn_source}")
    return " ".join(parts) or "-"


def backend_label(site: AttentionSite) -> str:
    """The backend, with the reason when a site fell back from the one asked for."""
    fallback = [n.split(":", 1)[1].strip() for n in site.notes if " fallback:" in n]
    return f"{site.backend} ({fallback[0]})" if fallback else site.backend
