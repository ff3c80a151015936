"""Render one attention site's subgraph, before and after canonicalization, as a
self-contained HTML page (what ``rewriter inspect MODEL --site N --graph html --out FILE``
writes), with the library's own layout: no graphviz needed.

    .venv/bin/python examples/inspect_site_html.py [--model smollm2-135m] [--site 0]
        [--out site0.html]

The canonical ``rewriter.attention`` node is highlighted in the "after" graph, and so are the
nodes of the captured graph that it replaced in the "before" graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import rewriter as rw
from rewriter.analysis import graphviz


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, HF dir or .gguf")
    parser.add_argument("--site", type=int, default=0, help="site index (see prog.summary())")
    parser.add_argument("--out", type=Path, help="the page (default: siteN.html here)")
    a = parser.parse_args(argv)
    a.out = a.out or Path(f"site{a.site}.html")

    prog = rw.load_model(a.model).capture(seq_len=16)
    site = prog.sites[a.site]
    print(f"{a.model}: {len(prog.sites)} attention sites; site {a.site} is "
          f"{site.module_path} ({site.pattern}, {site.num_heads} heads / "
          f"{site.num_kv_heads} KV heads, D {site.head_dim}, {site.positional}, {site.mask})")

    graphs = graphviz.site_graphs(prog, a.site)   # {"before": SiteGraph, "after": SiteGraph}
    for name, g in graphs.items():
        marked = ", ".join(label.split("\n")[1] for node, label in g.nodes
                           if node in g.highlight)
        print(f"  {name:<6} {len(g.nodes):3d} nodes; highlighted: {marked}")
    title = f"site {a.site}: {site.module_path or 'attention'}"
    a.out.write_text(graphviz.to_html(graphs, title))    # inline SVG, no external files
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e3:.0f} kB): open it in a browser")
    return {"out": a.out, "node": site.node,
            "nodes": {name: len(g.nodes) for name, g in graphs.items()},
            "highlight": {name: sorted(g.highlight) for name, g in graphs.items()}}


if __name__ == "__main__":
    main()
