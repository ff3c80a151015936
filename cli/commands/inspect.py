"""``rewriter inspect``: the attention sites of a model, one site in detail or as a graph, two
programs compared, or the kernel cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rewriter.cli.errors import user_errors
from rewriter.cli.options import (
    DEFAULT_SEQ_LEN,
    MODEL_HELP,
    DtypeOpt,
    ExplainOpt,
    ForceOpt,
    JsonOpt,
    RevisionOpt,
    SeqLenOpt,
    TrustPickleOpt,
    check_choice,
)
from rewriter.cli.progress import Reporter
from rewriter.cli.render import (
    list_kernels,
    print_diff,
    print_site,
    print_sites,
    render_site,
    stderr_console,
)
from rewriter.cli.sources import open_model
from rewriter.errors import NoAttentionError, RewriterError, SpecError


def inspect(
    model: Annotated[
        str | None,
        typer.Argument(metavar="MODEL", show_default=False, help=MODEL_HELP),
    ] = None,
    explain: ExplainOpt = False,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    as_json: JsonOpt = False,
    kernels: Annotated[
        bool,
        typer.Option("--kernels", help="List the generated Triton kernels in the kernel cache "
                     "($REWRITER_KERNEL_CACHE) instead; no MODEL needed."),
    ] = False,
    site: Annotated[
        int | None,
        typer.Option("--site", min=0, metavar="N", show_default=False,
                     help="Show one site: its details, or with --graph its subgraph before "
                     "and after canonicalization."),
    ] = None,
    graph: Annotated[
        str | None,
        typer.Option("--graph", metavar="dot|svg|html", show_default=False,
                     help="Render site --site (default 0) to --out: DOT text, SVG (needs "
                     "graphviz's dot) or a self-contained HTML page."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE", show_default=False,
                     help="Where --graph writes (default: stdout)."),
    ] = None,
    diff: Annotated[
        str | None,
        typer.Option("--diff", metavar="OTHER", show_default=False,
                     help="Compare MODEL with OTHER (MODEL|DIR): sites and parameters "
                     "changed."),
    ] = None,
    force: ForceOpt = False,
    trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
) -> None:
    """List every attention in MODEL and check that canonicalizing it is an identity.

    Loads MODEL (or a directory written by `rewriter convert`), captures it with torch.export
    on a batch of 2 token windows of real text, finds and canonicalizes every attention,
    prints one row per site and compares the canonicalized program with the captured graph
    on the same inputs. `--site N --graph FMT --out FILE` renders one site; `--diff OTHER`
    compares two programs."""
    if kernels:
        list_kernels(as_json)
        return
    if model is None:
        raise typer.BadParameter("missing (or pass --kernels)", param_hint="MODEL")
    with user_errors(), Reporter(stderr_console()) as rep:
        check_choice(graph, ("dot", "svg", "html"), "--graph")
        if out is not None and graph is None:
            raise SpecError("--out needs --graph dot|svg|html")
        if out is not None and out.exists() and not force:
            from rewriter.io.atomic import OutputExistsError

            raise OutputExistsError(f"{out} exists: pick another --out or pass --force")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle, dtype=dtype,
                          revision=revision,
                          require_attention=not explain)
        if diff is not None:
            other = open_model(diff, seq_len, rep, trust_pickle=trust_pickle)
            print_diff(model, diff, prog, other, as_json)
            return
        if graph is not None:
            render_site(prog, site or 0, graph, out)
            return
        if site is not None:
            print_site(prog, site, as_json)
            return
        with rep.step("verifying"):
            # a program loaded from disk has no captured graph to compare with
            report = prog.verify(float64=True) if prog.has_original else None
        print_sites(model, seq_len, prog, report, explain, as_json)
        if not prog.sites:
            raise NoAttentionError(f"no attention found in {model} "
                                   f"({len(prog.rejected)} softmax/SDPA anchor(s) rejected)")
        if report is not None and not report.ok:
            raise RewriterError(f"identity check failed: the canonicalized program does not "
                                f"match the captured graph ({report})")
