"""Render one attention site's subgraph as DOT, SVG (through graphviz's ``dot``) or a
self-contained HTML page (an inline SVG laid out here, no graphviz needed).

The subgraph of a site is every node on a path from its q/k/v projections to its output
projection (both ends included). ``before`` is taken from the captured graph (before
canonicalization), ``after`` from the program's module; the canonical
``rewriter.attention`` node is highlighted, and so are the nodes of ``before`` it replaced.

    from rewriter.analysis.graphviz import site_graphs, to_dot, to_html
    graphs = site_graphs(prog, 0)          # {"before": SiteGraph | None, "after": SiteGraph}
    text = to_dot(graphs)
"""

from __future__ import annotations

import html
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

from rewriter.errors import RewriterError

CANONICAL = "rewriter.attention"
MAX_NODES = 400


@dataclass
class SiteGraph:
    title: str
    nodes: list[tuple[str, str]]  # (name, label) in graph order
    edges: list[tuple[str, str]]
    highlight: set[str] = field(default_factory=set)


def _target_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if node.target is torch.ops.rewriter.attention.default:
            return CANONICAL
        return name.replace(".default", "")
    if node.op == "get_attr":
        return str(node.target)
    return node.op


def _label(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    shape = f"\n{list(val.shape)}" if isinstance(val, torch.Tensor) else ""
    return f"{node.name}\n{_target_name(node)}{shape}"


def _reachable(starts, neighbours) -> set[str]:
    """Names of the nodes reachable from ``starts`` (inclusive) along ``neighbours``."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(neighbours(n))
    return seen


def subgraph(graph: torch.fx.Graph, sources: list[str], sink: str, title: str,
             keep_inputs: bool = True) -> SiteGraph:
    """Nodes reachable from any of ``sources`` that reach ``sink`` (inclusive), plus their
    direct get_attr / placeholder inputs (weights, masks) when ``keep_inputs``."""
    by_name = {n.name: n for n in graph.nodes}
    starts = [by_name[s] for s in sources if s in by_name]
    if sink not in by_name or not starts:
        missing = [s for s in [*sources, sink] if s not in by_name]
        raise KeyError(f"nodes {missing} are not in the graph")
    down = _reachable(starts, lambda n: n.users)
    up = _reachable([by_name[sink]], lambda n: n.all_input_nodes)
    keep = down & up
    if keep_inputs:
        extra = {i.name for name in keep for i in by_name[name].all_input_nodes
                 if i.op in ("get_attr", "placeholder") or not i.all_input_nodes}
        # the inputs of the projections (the hidden states) as one entry point each
        extra |= {i.name for s in starts for i in s.all_input_nodes}
        keep |= extra
    ordered = [n for n in graph.nodes if n.name in keep][:MAX_NODES]
    names = {n.name for n in ordered}
    edges = [(i.name, n.name) for n in ordered for i in n.all_input_nodes if i.name in names]
    highlight = {n.name for n in ordered if _target_name(n) == CANONICAL}
    return SiteGraph(title, [(n.name, _label(n)) for n in ordered], edges, highlight)


def site_graphs(program, index: int) -> dict[str, SiteGraph | None]:
    """{"before": ..., "after": ...} for site ``index`` (before is None for a program loaded
    from disk, which keeps no captured graph)."""
    site = program.site(index)
    sources = [p.node for p in (site.q_proj, site.k_proj, site.v_proj) if p is not None]
    sink = site.o_proj.node if site.o_proj is not None else site.node
    if not sources:
        sources = [site.node]
    after = subgraph(program.module.graph, sources, sink, f"site {index} after")
    try:
        original = program.original
    except AttributeError:
        return {"before": None, "after": after}
    try:
        before = subgraph(original.graph, sources, sink, f"site {index} before")
    except KeyError:
        return {"before": None, "after": after}
    after_names = {name for name, _ in after.nodes}
    before.highlight = {name for name, _ in before.nodes if name not in after_names}
    return {"before": before, "after": after}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graphs: dict[str, SiteGraph | None], title: str = "site") -> str:
    lines = [f"digraph {_quote(title)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica,'
             ' fontsize=10];']
    for key, g in graphs.items():
        if g is None:
            continue
        lines.append(f"  subgraph {_quote('cluster_' + key)} {{")
        lines.append(f"    label={_quote(g.title)};")
        for name, label in g.nodes:
            style = ', fillcolor="#ffd54f", penwidth=2' if name in g.highlight else ""
            lines.append(f"    {_quote(key + ':' + name)} [label={_quote(label)}{style}];")
        for a, b in g.edges:
            lines.append(f"    {_quote(key + ':' + a)} -> {_quote(key + ':' + b)};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def to_svg(dot: str) -> str:
    """SVG from graphviz's ``dot`` (check `dot_available` first)."""
    proc = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dot failed: {proc.stderr.strip()[:200]}")
    return proc.stdout


# ---- a layered layout for the HTML page (no graphviz) --------------------------------------

BOX_W, BOX_H, GAP_X, GAP_Y = 190, 46, 20, 34


def _layout(g: SiteGraph) -> dict[str, tuple[int, int]]:
    """Longest-path layering (nodes are in topological order), then left-to-right slots."""
    preds: dict[str, list[str]] = {name: [] for name, _ in g.nodes}
    for a, b in g.edges:
        preds[b].append(a)
    layer: dict[str, int] = {}
    for name, _ in g.nodes:
        layer[name] = 1 + max((layer[p] for p in preds[name]), default=-1)
    slots: dict[int, int] = {}
    pos = {}
    for name, _ in g.nodes:
        col = slots.get(layer[name], 0)
        slots[layer[name]] = col + 1
        pos[name] = (col, layer[name])
    return pos


def svg_of(g: SiteGraph) -> str:
    pos = _layout(g)
    width = (max((c for c, _ in pos.values()), default=0) + 1) * (BOX_W + GAP_X) + GAP_X
    height = (max((r for _, r in pos.values()), default=0) + 1) * (BOX_H + GAP_Y) + GAP_Y

    def xy(name: str) -> tuple[int, int]:
        c, r = pos[name]
        return GAP_X + c * (BOX_W + GAP_X), GAP_Y + r * (BOX_H + GAP_Y)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="Helvetica, Arial, sans-serif" font-size="10">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
             'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/>'
             '</marker></defs>']
    for a, b in g.edges:
        (x1, y1), (x2, y2) = xy(a), xy(b)
        parts.append(f'<line x1="{x1 + BOX_W // 2}" y1="{y1 + BOX_H}" x2="{x2 + BOX_W // 2}" '
                     f'y2="{y2}" stroke="#999" marker-end="url(#arrow)"/>')
    for name, label in g.nodes:
        x, y = xy(name)
        fill, stroke = ("#ffd54f", "#e65100") if name in g.highlight else ("#fff", "#555")
        parts.append(f'<g class="node"><title>{html.escape(label)}</title>'
                     f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
                     f'fill="{fill}" stroke="{stroke}"/>')
        for i, line in enumerate(label.split("\n")[:3]):
            text = line if len(line) <= 32 else line[:31] + "…"
            weight = ' font-weight="bold"' if i == 1 else ""
            parts.append(f'<text x="{x + BOX_W // 2}" y="{y + 13 + 12 * i}" '
                         f'text-anchor="middle"{weight}>{html.escape(text)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def to_html(graphs: dict[str, SiteGraph | None], title: str = "site",
            svg: str | None = None) -> str:
    """One page: graphviz's SVG when given, else side-by-side inline SVGs laid out here."""
    body = []
    if svg is not None:
        body.append(svg[svg.find("<svg"):])
    else:
        for g in graphs.values():
            if g is None:
                continue
            body.append(f'<section><h2>{html.escape(g.title)} ({len(g.nodes)} nodes)</h2>'
                        f"{svg_of(g)}</section>")
        if graphs.get("before") is None:
            body.append("<p>No graph before canonicalization: the program was loaded from "
                        "disk.</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
            "main{display:flex;gap:2em;align-items:flex-start}section{overflow:auto}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Highlighted: the canonical "
            f"<code>{CANONICAL}</code> node (after) and the nodes it replaced (before).</p>"
            f"<main>{''.join(body)}</main></body></html>\n")


def render_site(program, index: int, fmt: str = "html") -> tuple[str, int]:
    """Site ``index``'s subgraph before and after canonicalization as ``fmt`` ("dot", "svg"
    (needs graphviz's ``dot``) or "html": self-contained, laid out by graphviz where it is
    installed, else by its own layout); returns (text, number of nodes drawn)."""
    graphs = site_graphs(program, index)
    title = f"site {index}: {program.site(index).module_path or 'attention'}"
    dot = to_dot(graphs, title)
    if fmt == "dot":
        text = dot
    elif fmt == "svg":
        if not dot_available():
            raise RewriterError("--graph svg needs graphviz's `dot` on PATH; use --graph html "
                                "(a self-contained page) or --graph dot")
        text = to_svg(dot)
    elif fmt == "html":
        text = to_html(graphs, title, to_svg(dot) if dot_available() else None)
    else:
        raise RewriterError(f"graph format {fmt!r}: allowed dot, svg, html")
    return text, sum(len(g.nodes) for g in graphs.values() if g)
