"""``rewriter variants``: the variant specs ``convert --variant`` accepts, from the registry."""

from __future__ import annotations

import json

import typer

from rewriter.cli.options import JsonOpt
from rewriter.cli.render import stdout_width, variants_document, variants_text


def variants(as_json: JsonOpt = False) -> None:
    """List every variant a `--variant SPEC` can name: its spec syntax and what it does."""
    from rewriter.passes import VARIANTS

    if as_json:
        typer.echo(json.dumps(variants_document(VARIANTS.values()), indent=2, default=str))
        return
    # summaries are prose: wrapped at 100 columns even where tables may use a wider terminal
    typer.echo(variants_text(VARIANTS.values(), min(stdout_width(), 100)))
