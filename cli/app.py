"""The ``rewriter`` command line: the typer app, its root options and its commands.

Each command lives in rewriter.cli.commands and is one or a few calls of the public API plus
printing (rewriter.cli.render). torch and transformers are imported inside the commands, so
``rewriter --help`` does not load them. Domain errors print ``error: <message>`` on stderr and
exit with the error's code, with no traceback (rewriter.cli.errors); outputs appear complete
or not at all (rewriter.io.atomic).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated

import typer

from rewriter.cli.commands import convert, demo, export, inspect, variants
from rewriter.cli.commands import eval as eval_command

app = typer.Typer(
    name="rewriter",
    help="Find, canonicalize and rewrite the attention in pretrained models.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("attention-rewriter")
        except PackageNotFoundError:  # running from a source tree that is not installed
            from rewriter import __version__ as v
        typer.echo(f"rewriter {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Show the version and exit."),
    ] = False,
) -> None:
    """Find, canonicalize and rewrite the attention in pretrained models."""
    # transformers' GGUF de-quantizer draws a tqdm bar of its own; ours are on stderr.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Library warnings (torch, transformers) are not the user's to act on here.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


# Registration order is the order `rewriter --help` lists the commands in.
app.command()(inspect.inspect)
app.command()(export.export)
app.command()(convert.convert)
app.command("eval")(eval_command.eval_)
app.command()(demo.demo)
app.command()(variants.variants)


def main() -> None:
    """Entry point of the ``rewriter`` console script."""
    app(prog_name="rewriter")


if __name__ == "__main__":
    sys.exit(main())
