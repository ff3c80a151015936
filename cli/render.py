"""What the commands print: tables and reports on stdout, JSON documents for ``--json``, and
the consoles they go to. Progress and errors go to stderr (rewriter.cli.progress, errors)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from rewriter.cli.sources import EXAMPLE_BATCH
from rewriter.errors import SpecError

if TYPE_CHECKING:
    from rewriter.program import Program


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def stdout_width() -> int:
    """The terminal's width, or 160 columns when stdout is piped (tables stay unwrapped)."""
    out = Console()
    return out.width if out.is_terminal else 160


# ---------------------------------------------------------------------------------------------
# inspect


def print_sites(name: str, seq_len: int, prog: Program, report, explain: bool,
                as_json: bool) -> None:
    """One row per site and the identity check (or the JSON document)."""
    if as_json:
        typer.echo(json.dumps(inspect_document(name, seq_len, prog, report), indent=2))
        return
    if prog.sites:
        typer.echo(prog.summary(width=stdout_width()).rstrip("\n"))
    check = f"identity check: {report}" if report is not None else \
        f"loaded from disk ({prog.parameter_count():,} parameters)"
    typer.echo(f"{len(prog.sites)} attention sites; {check}")
    if explain:
        typer.echo(explanation(prog))


def inspect_document(name: str, seq_len: int, prog: Program, report: Any) -> dict:
    return {
        "model": name,
        "seq_len": seq_len,
        "batch": EXAMPLE_BATCH,
        "num_sites": len(prog.sites),
        "sites": [site.to_dict() for site in prog.sites],
        "rejected": [asdict(r) for r in prog.rejected],
        "verify": None if report is None else report.to_dict(),
    }


def explanation(prog: Program) -> str:
    """Why each softmax/SDPA anchor that is not a site was rejected."""
    if not prog.rejected:
        return f"all {len(prog.sites)} softmax/SDPA anchors matched"
    lines = [f"{len(prog.rejected)} softmax/SDPA anchor(s) not matched:"]
    for r in prog.rejected:
        lines.append(f"  {r.module_path or '<root>'}  {r.op} ({r.node}): {r.reason}")
    return "\n".join(lines)


def checked_site(prog: Program, index: int):
    """Site ``index``, or a SpecError naming the valid range."""
    try:
        return prog.site(index)
    except IndexError as err:
        raise SpecError(f"--site {index}: {err}") from None


def print_site(prog: Program, index: int, as_json: bool) -> None:
    site = checked_site(prog, index)
    if as_json:
        typer.echo(json.dumps(site.to_dict(), indent=2, default=str))
        return
    for key, value in site.to_dict().items():
        if value not in (None, "", [], 0.0) or key in ("num_heads", "num_kv_heads", "index"):
            typer.echo(f"{key:>14}  {value}")


def render_site(prog: Program, index: int, fmt: str, out: Path | None) -> None:
    """One site's subgraph (rewriter.analysis.graphviz.render_site) on stdout, or written
    atomically to ``out``."""
    from rewriter.analysis import graphviz
    from rewriter.io.atomic import atomic_file

    checked_site(prog, index)
    text, nodes = graphviz.render_site(prog, index, fmt)
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic_file(out, text)
    typer.echo(f"wrote {out} ({fmt}, {nodes} nodes)")


def print_diff(name_a: str, name_b: str, a: Program, b: Program, as_json: bool) -> None:
    """Sites and parameters that differ between two programs."""
    from rewriter.analysis.diff import diff_programs

    d = diff_programs(a, b)
    if as_json:
        typer.echo(json.dumps({"a": name_a, "b": name_b, **d}, indent=2, default=str))
        return
    pa, pb = d["parameters"]
    ka, kb = d["kv_cache_bytes_per_token"]
    typer.echo(f"--- {name_a}\n+++ {name_b}")
    typer.echo(f"sites: {d['sites'][0]} -> {d['sites'][1]}; parameters: {pa:,} -> {pb:,} "
               f"({pb - pa:+,}); KV cache bytes/token: {ka:,} -> {kb:,}")
    changes = d["site_changes"]
    typer.echo(f"{len(changes)} site(s) changed" + (":" if changes else ""))
    for row in changes:
        if row["change"] != "changed":
            typer.echo(f"  {row['site']}: {row['change']}")
            continue
        fields = ", ".join(f"{k} {v[0]!r}->{v[1]!r}" if isinstance(v[0], str) or
                           isinstance(v[1], str) else f"{k} {v[0]}->{v[1]}"
                           for k, v in row["fields"].items())
        typer.echo(f"  {row['site']}: {fields}")
    p = d["parameter_changes"]
    typer.echo(f"parameters: {len(p['added'])} added, {len(p['removed'])} removed, "
               f"{len(p['reshaped'])} reshaped")
    for n, shape in p["added"].items():
        typer.echo(f"  + {n} {shape}")
    for n, shape in p["removed"].items():
        typer.echo(f"  - {n} {shape}")
    for n, (s, t) in p["reshaped"].items():
        typer.echo(f"  ~ {n} {s} -> {t}")


def list_kernels(as_json: bool) -> None:
    """Print the kernel cache: one row per generated kernel (key, name, specialization)."""
    from rewriter.codegen.triton.cache import cache_dir
    from rewriter.codegen.triton.cache import list_kernels as cached

    entries = cached()
    if as_json:
        typer.echo(json.dumps({"cache": str(cache_dir()), "kernels": entries}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(entries)} kernels in {cache_dir()}", header_style="bold")
    for col in ("key", "kernel", "dtype", "D", "G", "causal", "mask", "sparsity"):
        table.add_column(col)
    for e in entries:
        sparsity = ("per-head" if e.get("per_head") else
                    f"window={e['window']}" if e.get("window") else
                    f"neighborhood={e['neighborhood']},grid={'x'.join(map(str, e['grid']))}"
                    if e.get("neighborhood") else "dense")
        sparsity += f",sink={e['sink']}" if e.get("sink") else ""
        sparsity += f",dilation={e['dilation']}" if e.get("dilation", 1) > 1 else ""
        table.add_row(e["key"], e["name"], str(e.get("dtype", "")), str(e.get("head_dim", "")),
                      str(e.get("group", "")), str(e.get("causal", "")), str(e.get("mask", "")),
                      sparsity)
    Console(width=stdout_width()).print(table)


# ---------------------------------------------------------------------------------------------
# convert, export, demo


def conversion_report(model: str, specs: list[str], before: dict, manifest: dict, report,
                      onnx_rows: list | None) -> str:
    """Before -> after of a conversion: sites, parameters, KV cache, error, perplexity, hf/,
    model.onnx (``before``: rewriter.analysis.accounting.program_facts)."""
    pa, pb = before["parameters"], manifest["parameters"]
    ka, kb = before["kv_cache_bytes_per_token"], manifest["kv_cache_bytes_per_token"]
    lines = [f"{model} -> {' + '.join(specs)}",
             f"  sites          {len(before['sites'])} -> {len(manifest['sites'])} "
             f"({sites_line(manifest['sites'])})",
             f"  parameters     {pa:,} -> {pb:,} ({(pb - pa) / max(pa, 1):+.1%})",
             f"  KV cache       {ka:,} -> {kb:,} bytes/token (bf16, {kb / max(ka, 1):.0%})"
             + (f"; bounded to {manifest['kv_cache_bound_tokens']} tokens per streaming head "
                f"({manifest['kv_cache_bytes_at_1024']:,} bytes at 1024)"
                if manifest.get("kv_cache_bound_tokens") else "")]
    if report is not None:
        lines.append(f"  verify         max relative error vs {model}: {report.max_rel:.3g} "
                     "(example inputs)")
    quality = manifest.get("quality")
    if quality:
        a, b = quality["perplexity"]
        healed = f"{quality['unhealed']:.2f} -> healed {b:.2f}" if "unhealed" in quality \
            else f"{b:.2f}"
        lines.append(f"  perplexity     {a:.2f} -> {healed} ({quality['windows']} x "
                     f"{quality['ctx']} tokens, held-out text)")
    hf = manifest.get("hf") or {}
    lines.append(f"  hf/            {'written' if hf.get('written') else 'not written'}: "
                 f"{hf.get('reason', '')}")
    if onnx_rows is not None:
        lines.append(f"  model.onnx     {onnx_ops(onnx_rows)}")
    return "\n".join(lines)


def sites_line(sites: list[dict]) -> str:
    """The distinct site shapes, e.g. '30 x Hq 9 / Hkv 1, D 64, window=256,sink=4'."""
    kinds: dict[str, int] = {}
    for s in sites:
        key = f"Hq {s['num_heads']} / Hkv {s['num_kv_heads']}, D {s['head_dim']}"
        if s.get("sparsity"):
            key += f", {s['sparsity']}"
        kinds[key] = kinds.get(key, 0) + 1
    return "; ".join(f"{n} x {k}" for k, n in kinds.items())


def onnx_ops(rows: list[dict]) -> str:
    """The ONNX ops the sites became, e.g. '2 x GroupQueryAttention'."""
    ops: dict[str, int] = {}
    for row in rows:
        ops[row["op"]] = ops.get(row["op"], 0) + 1
    return ", ".join(f"{n} x {op}" for op, n in ops.items())


# ---------------------------------------------------------------------------------------------
# variants


def variants_document(variants: Iterable) -> dict:
    """The variant registry (rewriter.passes.VARIANTS values) as JSON data."""
    return {"variants": [
        {"name": v.name, "usage": list(v.usage), "summary": v.summary,
         "keys": {k: {"metavar": key.metavar, "allowed": key.allowed,
                      "default": key.default, "required": key.required}
                  for k, key in v.keys.items()}}
        for v in variants]}


def variants_text(variants: Iterable, width: int) -> str:
    """Each variant's spec lines, then its summary indented below them."""
    blocks = []
    for v in variants:
        summary = textwrap.fill(v.summary, width=max(width, 40) - 1, initial_indent="    ",
                                subsequent_indent="    ")
        blocks.append("\n".join([*v.usage, summary]))
    return "\n\n".join(blocks)
