"""``rewriter eval``: perplexity and throughput of a model on one backend."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from rewriter.cli.errors import one_line, user_errors
from rewriter.cli.options import (
    DEFAULT_SEQ_LEN,
    BackendOpt,
    CtxOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    SeqLenOpt,
    TrustPickleOpt,
    WindowsOpt,
    backend_names,
    check_choice,
    read_text,
)
from rewriter.cli.progress import Reporter
from rewriter.cli.render import stderr_console
from rewriter.cli.sources import need_tokenizer, open_model
from rewriter.errors import RewriterError


def eval_(
    model: ModelArg,
    text: Annotated[
        Path | None,
        typer.Option("--text", metavar="FILE", show_default=False,
                     help="A UTF-8 text file to evaluate on (default: held-out pydoc_data "
                     "text)."),
    ] = None,
    ctx: CtxOpt = 256,
    windows: WindowsOpt = 4,
    backend: BackendOpt = "eager",
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity and tokens/s of MODEL (or a converted DIR) on windows of text."""
    from rewriter.analysis import quality
    from rewriter.codegen import runner

    with user_errors(), Reporter(stderr_console()) as rep:
        check_choice(backend, backend_names(), "--backend")
        body = read_text(text, "--text")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle, dtype=dtype,
                          revision=revision)
        tokenizer = need_tokenizer(prog, "eval")
        if not quality.is_language_model(prog):
            raise RewriterError(f"{model} is not a language model (it returns no logits): "
                                "perplexity does not apply")
        ids = quality.held_out_windows(tokenizer, ctx, windows, text=body)
        with tempfile.TemporaryDirectory(prefix="rewriter-eval-") as tmp:
            with rep.step(f"preparing the {backend} backend"):
                try:
                    fn = quality.logits_fn(prog, runner(prog, backend, Path(tmp)))
                except RewriterError:
                    raise
                except Exception as exc:  # whatever a backend's toolchain raises: one line
                    raise RewriterError(f"backend {backend}: {one_line(exc)}") from None
                fn(ids[:1])  # warm-up (kernel compilation, session start, first shapes)
            start = time.perf_counter()
            ppl = quality.perplexity(fn, ids, progress=lambda d, n: rep.callback(
                f"perplexity ({windows} x {ctx} tokens)", d, n))
            seconds = time.perf_counter() - start
    doc = {"model": model, "backend": backend, "ctx": ctx, "windows": windows,
           "text": str(text) if text else "pydoc_data.topics (held out)",
           "perplexity": ppl, "tokens_per_s": ids.numel() / seconds, "seconds": seconds}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"{model} ({backend}): perplexity {ppl:.3f} on {windows} x {ctx} tokens of "
               f"{doc['text']}; {doc['tokens_per_s']:,.0f} tokens/s ({seconds:.1f} s)")
