"""How the CLI reports failures: domain errors (`rewriter.errors.RewriterError`) print
``error: <message>`` on stderr and exit with the error's ``exit_code``; so do failed writes
(``OSError``, exit 1). Neither shows a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from rewriter.errors import RewriterError


def one_line(exc: BaseException) -> str:
    """The error's message on one line (an OSError as "strerror: filename")."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    return " ".join(text.split()) or type(exc).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """RewriterError -> one line on stderr and the error's exit code; a failed write
    (OSError) -> one line and exit 1."""
    try:
        yield
    except RewriterError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(code=exc.exit_code) from None
    except OSError as exc:
        typer.echo(f"error: write failed: {one_line(exc)}", err=True)
        raise typer.Exit(code=1) from None
