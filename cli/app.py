"""The ``rewriter`` command line: thin commands over the public Python API.

Every command is one call of the API plus printing. torch and transformers are imported inside
the commands, so ``rewriter --help`` does not load them. Domain errors
(`rewriter.errors.RewriterError`) print ``error: <message>`` on stderr and exit with the error's
``exit_code``; they never show a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from rewriter.errors import NoAttentionError, RewriterError

if TYPE_CHECKING:
    import torch

    from rewriter.program import Program

app = typer.Typer(
    name="rewriter",
    help="Find, canonicalize and rewrite the attention in pretrained models.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------------------------------------
# Shared argument and option types (reused by every command that takes a model).

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A zoo name (smollm2-135m, minilm-l6), a Hugging Face model directory, "
        "or a .gguf file.",
        show_default=False,
    ),
]
SeqLenOpt = Annotated[
    int,
    typer.Option("--seq-len", min=1, metavar="N",
                 help="Sequence length of the example inputs used for capture."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables."),
]
ExplainOpt = Annotated[
    bool,
    typer.Option("--explain",
                 help="Also list every softmax/SDPA that was not recognized as attention, "
                 "with its module path and the reason."),
]

DEFAULT_SEQ_LEN = 16
EXAMPLE_BATCH = 2


# ---------------------------------------------------------------------------------------------
# Helpers (module-level so tests can monkeypatch them).


@dataclass
class ModelInputs:
    """A loaded model and the example inputs it is captured with."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict


def load_model(model: str, seq_len: int, batch: int = EXAMPLE_BATCH) -> ModelInputs:
    """`rewriter.models.load` plus example inputs built from real text."""
    from rewriter import models

    loaded = models.load(model)
    try:
        args, kwargs = loaded.example_inputs(seq_len, batch=batch)
    except ValueError as exc:  # the text is shorter than the inputs asked for
        raise typer.BadParameter(str(exc), param_hint="--seq-len") from exc
    return ModelInputs(loaded.name, loaded.model, args, kwargs)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextmanager
def step(console: Console, message: str) -> Iterator[None]:
    """A spinner on stderr while a slow step runs, then one line with its duration
    (both only on a terminal: piped output stays clean)."""
    start = time.perf_counter()
    with console.status(f"{message}…"):
        yield
    if console.is_terminal:
        console.print(f"[green]✓[/] {message} ({time.perf_counter() - start:.1f} s)")


@contextmanager
def user_errors() -> Iterator[None]:
    """RewriterError -> one line on stderr and the error's exit code."""
    try:
        yield
    except RewriterError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=exc.exit_code) from None


def _stdout_width() -> int:
    out = Console()
    return out.width if out.is_terminal else 160


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


# ---------------------------------------------------------------------------------------------
# Commands.


@app.command()
def inspect(
    model: Annotated[
        str | None,
        typer.Argument(metavar="MODEL", show_default=False,
                       help="A zoo name (smollm2-135m, minilm-l6), a Hugging Face model "
                       "directory, or a .gguf file."),
    ] = None,
    explain: ExplainOpt = False,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    as_json: JsonOpt = False,
    kernels: Annotated[
        bool,
        typer.Option("--kernels", help="List the generated Triton kernels in the kernel cache "
                     "($REWRITER_KERNEL_CACHE) instead; no MODEL needed."),
    ] = False,
) -> None:
    """List every attention in MODEL and check that canonicalizing it is an identity.

    Loads MODEL, captures it with torch.export on a batch of 2 token windows of real text,
    finds and canonicalizes every attention, prints one row per site and compares the
    canonicalized program with the captured graph on the same inputs."""
    if kernels:
        list_kernels(as_json)
        return
    if model is None:
        raise typer.BadParameter("missing (or pass --kernels)", param_hint="MODEL")
    import rewriter as rw

    err = stderr_console()
    with user_errors():
        with step(err, f"loading {model}"):
            inputs = load_model(model, seq_len)
        with step(err, f"capturing {inputs.name} (seq-len {seq_len})"):
            # With --explain a model without attention still gets its rejections listed.
            prog = rw.capture(inputs.model, inputs.args, inputs.kwargs,
                              require_attention=not explain)
        with step(err, "verifying"):
            report = prog.verify()

        if as_json:
            typer.echo(json.dumps(inspect_document(inputs.name, seq_len, prog, report),
                                  indent=2))
        else:
            if prog.sites:
                typer.echo(prog.summary(width=_stdout_width()).rstrip("\n"))
            typer.echo(f"{len(prog.sites)} attention sites; identity check: {report}")
            if explain:
                typer.echo(explanation(prog))
        if not prog.sites:
            raise NoAttentionError(f"no attention found in {inputs.name} "
                                   f"({len(prog.rejected)} softmax/SDPA anchor(s) rejected)")
        if not report.ok:
            raise RewriterError(f"identity check failed: the canonicalized program does not "
                                f"match the captured graph ({report})")


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
                    f"window={e['window']}" if e.get("window") else "dense")
        sparsity += f",sink={e['sink']}" if e.get("sink") else ""
        sparsity += f",dilation={e['dilation']}" if e.get("dilation", 1) > 1 else ""
        table.add_row(e["key"], e["name"], str(e.get("dtype", "")), str(e.get("head_dim", "")),
                      str(e.get("group", "")), str(e.get("causal", "")), str(e.get("mask", "")),
                      sparsity)
    Console(width=_stdout_width()).print(table)


def inspect_document(name: str, seq_len: int, prog: Program, report: Any) -> dict:
    return {
        "model": name,
        "seq_len": seq_len,
        "batch": EXAMPLE_BATCH,
        "num_sites": len(prog.sites),
        "sites": [site.to_dict() for site in prog.sites],
        "rejected": [asdict(r) for r in prog.rejected],
        "verify": report.to_dict(),
    }


def explanation(prog: Program) -> str:
    if not prog.rejected:
        return f"all {len(prog.sites)} softmax/SDPA anchors matched"
    lines = [f"{len(prog.rejected)} softmax/SDPA anchor(s) not matched:"]
    for r in prog.rejected:
        lines.append(f"  {r.module_path or '<root>'}  {r.op} ({r.node}): {r.reason}")
    return "\n".join(lines)


@app.command()
def export(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", "-o", metavar="PATH",
                                     help="Where to write the .onnx file (a PATH.json manifest "
                                     "is written next to it).")],
    target: Annotated[str, typer.Option(
        "--target", metavar="onnx|ort",
        help="onnx: standard ops (opset 23); ort: ONNX Runtime contrib ops "
        "(GroupQueryAttention, MultiHeadAttention) where they express the site.")] = "onnx",
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    as_json: JsonOpt = False,
) -> None:
    """Capture MODEL and export it to ONNX with dynamic batch and sequence axes."""
    import rewriter as rw

    err = stderr_console()
    with user_errors():
        if target not in ("onnx", "ort"):
            raise typer.BadParameter(f"{target!r} is not one of onnx, ort",
                                     param_hint="--target")
        with step(err, f"loading {model}"):
            inputs = load_model(model, seq_len)
        with step(err, f"capturing {inputs.name} (seq-len {seq_len})"):
            prog = rw.capture(inputs.model, inputs.args, inputs.kwargs)
        with step(err, f"exporting to {out} (target {target})"):
            rows = prog.export_onnx(out, target)
        if as_json:
            typer.echo(json.dumps({"model": inputs.name, "path": out, "target": target,
                                   "sites": rows}, indent=2))
        else:
            ops: dict[str, int] = {}
            for row in rows:
                ops[row["op"]] = ops.get(row["op"], 0) + 1
            summary = ", ".join(f"{n} x {op}" for op, n in ops.items())
            typer.echo(f"wrote {out}: {len(rows)} attention sites ({summary})")


def main() -> None:
    """Entry point of the ``rewriter`` console script."""
    app(prog_name="rewriter")


if __name__ == "__main__":
    sys.exit(main())
