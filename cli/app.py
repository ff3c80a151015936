"""The ``rewriter`` command line: thin commands over the public Python API.

Every command is one call of the API plus printing. torch and transformers are imported inside
the commands, so ``rewriter --help`` does not load them. Domain errors
(`rewriter.errors.RewriterError`) print ``error: <message>`` on stderr and exit with the error's
``exit_code``; so do failed writes (``OSError``, exit 1). They never show a traceback, and
outputs are written to a temporary directory beside the target and renamed at the end, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from rewriter.cli.progress import Reporter
from rewriter.cli.sources import classify, need_tokenizer
from rewriter.errors import ModelLoadError, NoAttentionError, RewriterError, SpecError

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

MODEL_HELP = ("A zoo name (smollm2-135m, minilm-l6), a Hugging Face model directory, a .gguf "
              "file, a directory written by `rewriter convert`, or pkg.module:factory (a "
              "callable returning (module, args[, kwargs]) or a rewriter.models.LoadedModel).")
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)]
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
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle",
                 help="Accept pickle weights (.bin/.pt); they are read with "
                 "torch.load(weights_only=True)."),
]
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="DIR", show_default=False,
                       help="Output directory (must not exist or be empty, unless --force)."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing --out (only once the new one is "
                       "complete)."),
]
VariantOpt = Annotated[
    list[str],
    typer.Option("--variant", "-v", metavar="SPEC", show_default=False,
                 help="A variant spec, e.g. gqa:kv-heads=1 or sparse:window=256,sink=4; "
                 "repeat to apply several in order."),
]
CtxOpt = Annotated[int, typer.Option("--ctx", min=2, metavar="N",
                                     help="Tokens per evaluation window.")]
WindowsOpt = Annotated[int, typer.Option("--windows", min=1, metavar="N",
                                         help="Number of evaluation windows.")]
OnnxTargetOpt = Annotated[
    str | None,
    typer.Option("--onnx", metavar="onnx|ort", show_default=False,
                 help="Also write model.onnx: onnx = standard ops (opset 23), ort = ONNX "
                 "Runtime contrib ops where they express a site."),
]

DEFAULT_SEQ_LEN = 16
EXAMPLE_BATCH = 2
ONNX_TARGETS = ("onnx", "ort")
BACKENDS = ("eager", "triton", "ort")


# ---------------------------------------------------------------------------------------------
# Helpers (module-level so tests can monkeypatch them).


@dataclass
class ModelInputs:
    """A loaded model and the example inputs it is captured with."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    tokenizer: Any = None


def load_model(model: str, seq_len: int, batch: int = EXAMPLE_BATCH, *,
               trust_pickle: bool = False) -> ModelInputs:
    """`rewriter.models.load` plus example inputs built from real text."""
    from rewriter import models

    loaded = models.load(model, trust_pickle=trust_pickle)
    try:
        args, kwargs = loaded.example_inputs(seq_len, batch=batch)
    except ValueError as exc:  # the text is shorter than the inputs asked for
        raise typer.BadParameter(str(exc), param_hint="--seq-len") from exc
    return ModelInputs(loaded.name, loaded.model, args, kwargs, loaded.tokenizer)


def open_model(model: str, seq_len: int, reporter: Reporter, *, trust_pickle: bool = False,
               require_attention: bool = True) -> Program:
    """The Program that MODEL names: loaded from a saved directory, or captured from a zoo
    name, HF directory, GGUF file or factory (see rewriter.cli.sources)."""
    import rewriter as rw
    from rewriter import models
    from rewriter.cli import sources

    source = classify(model)
    if source.kind == "saved":
        with reporter.step(f"loading {model}"):
            # torch.export.load finds transformers' output classes (CausalLMOutputWithPast,
            # ...) in pytree's registry only once their module is imported.
            import transformers.modeling_outputs  # noqa: F401

            program = rw.load(model)
            program.tokenizer = sources.tokenizer_for_saved(Path(model), program.manifest)
        return program
    if source.kind == "factory":
        with reporter.step(f"building {model}"):
            made = sources.call_factory(model)
        if isinstance(made, models.LoadedModel):
            inputs = ModelInputs(made.name, made.model,
                                 *made.example_inputs(seq_len, EXAMPLE_BATCH), made.tokenizer)
        else:
            inputs = ModelInputs(model, *made)
    else:
        with reporter.step(f"loading {model}"):
            inputs = load_model(model, seq_len, trust_pickle=trust_pickle)
    with reporter.step(f"capturing {inputs.name} (seq-len {seq_len})"):
        program = rw.capture(inputs.model, inputs.args, inputs.kwargs,
                             require_attention=require_attention)
    program.tokenizer = inputs.tokenizer
    program.manifest["source"] = source.reference
    return program


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


def one_line(exc: BaseException) -> str:
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


def _stdout_width() -> int:
    out = Console()
    return out.width if out.is_terminal else 160


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> None:
    if value is not None and value not in allowed:
        raise SpecError(f"{option} {value!r}: allowed values are {', '.join(allowed)}")


def _read_text(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{option} {path}: not a readable UTF-8 text file "
                             f"({one_line(exc)})") from None


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


def quiet_onnx() -> None:
    """torch.onnx warns that torchvision is missing; torch's logging setup resets levels at
    import, so this runs just before an export."""
    import torch  # noqa: F401

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# inspect


@app.command()
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
    err = stderr_console()
    with user_errors(), Reporter(err) as rep:
        _choice(graph, ("dot", "svg", "html"), "--graph")
        if out is not None and graph is None:
            raise SpecError("--out needs --graph dot|svg|html")
        if out is not None and out.exists() and not force:
            from rewriter.io.atomic import OutputExistsError

            raise OutputExistsError(f"{out} exists: pick another --out or pass --force")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle,
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
            report = prog.verify(float64=True) if prog._original is not None else None
        print_sites(model, seq_len, prog, report, explain, as_json)
        if not prog.sites:
            raise NoAttentionError(f"no attention found in {model} "
                                   f"({len(prog.rejected)} softmax/SDPA anchor(s) rejected)")
        if report is not None and not report.ok:
            raise RewriterError(f"identity check failed: the canonicalized program does not "
                                f"match the captured graph ({report})")


def print_sites(name: str, seq_len: int, prog: Program, report, explain: bool,
                as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(inspect_document(name, seq_len, prog, report), indent=2))
        return
    if prog.sites:
        typer.echo(prog.summary(width=_stdout_width()).rstrip("\n"))
    check = f"identity check: {report}" if report is not None else \
        f"loaded from disk ({prog.parameter_count():,} parameters)"
    typer.echo(f"{len(prog.sites)} attention sites; {check}")
    if explain:
        typer.echo(explanation(prog))


def _site(prog: Program, index: int):
    if not 0 <= index < len(prog.sites):
        raise SpecError(f"--site {index}: the program has {len(prog.sites)} sites "
                        f"(0..{len(prog.sites) - 1})")
    return prog.sites[index]


def print_site(prog: Program, index: int, as_json: bool) -> None:
    site = _site(prog, index)
    if as_json:
        typer.echo(json.dumps(site.to_dict(), indent=2, default=str))
        return
    for key, value in site.to_dict().items():
        if value not in (None, "", [], 0.0) or key in ("num_heads", "num_kv_heads", "index"):
            typer.echo(f"{key:>14}  {value}")


def render_site(prog: Program, index: int, fmt: str, out: Path | None) -> None:
    """DOT / SVG / HTML of one site's subgraph before and after canonicalization."""
    from rewriter.analysis import graphviz

    _site(prog, index)
    graphs = graphviz.site_graphs(prog, index)
    title = f"site {index}: {prog.sites[index].module_path or 'attention'}"
    dot = graphviz.to_dot(graphs, title)
    if fmt == "dot":
        text = dot
    elif fmt == "svg":
        if not graphviz.dot_available():
            raise RewriterError("--graph svg needs graphviz's `dot` on PATH; use --graph html "
                                "(a self-contained page) or --graph dot")
        text = graphviz.to_svg(dot)
    else:
        svg = graphviz.to_svg(dot) if graphviz.dot_available() else None
        text = graphviz.to_html(graphs, title, svg)
    if out is None:
        typer.echo(text, nl=False)
        return
    write_file_atomic(out, text)
    typer.echo(f"wrote {out} ({fmt}, {sum(len(g.nodes) for g in graphs.values() if g)} nodes)")


def write_file_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_diff(name_a: str, name_b: str, a: Program, b: Program, as_json: bool) -> None:
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
        "verify": None if report is None else report.to_dict(),
    }


def explanation(prog: Program) -> str:
    if not prog.rejected:
        return f"all {len(prog.sites)} softmax/SDPA anchors matched"
    lines = [f"{len(prog.rejected)} softmax/SDPA anchor(s) not matched:"]
    for r in prog.rejected:
        lines.append(f"  {r.module_path or '<root>'}  {r.op} ({r.node}): {r.reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# export


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
    kv_cache: Annotated[bool, typer.Option(
        "--kv-cache", help="Export a decoder step: past_key_N/past_value_N inputs and "
        "present_key_N/present_value_N outputs (causal LMs; checked against the model "
        "before export).")] = False,
    trust_pickle: TrustPickleOpt = False,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL (a checkpoint, zoo name or saved program) to ONNX with dynamic batch and
    sequence axes."""
    err = stderr_console()
    with user_errors(), Reporter(err) as rep:
        _choice(target, ONNX_TARGETS, "--target")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle)
        quiet_onnx()
        what = "decoder with KV cache" if kv_cache else "model"
        with rep.step(f"exporting the {what} to {out} (target {target})"):
            rows = prog.export_onnx(out, target, kv_cache=kv_cache)
    if as_json:
        typer.echo(json.dumps({"model": model, "path": out, "target": target,
                               "kv_cache": kv_cache, "sites": rows}, indent=2))
        return
    ops: dict[str, int] = {}
    for row in rows:
        ops[row["op"]] = ops.get(row["op"], 0) + 1
    summary = ", ".join(f"{n} x {op}" for op, n in ops.items())
    typer.echo(f"wrote {out}: {len(rows)} attention sites ({summary})"
               + (", with a KV cache" if kv_cache else ""))


# ---------------------------------------------------------------------------------------------
# convert


def program_facts(prog: Program) -> dict:
    """Sites, parameters and KV-cache bytes: the "before" (and "after") of a conversion."""
    acc = prog.accounting()
    return {"sites": [s.to_dict() for s in prog.sites],
            "parameters": prog.parameter_count(),
            "kv_cache_bytes_per_token": acc["kv_cache_bytes_per_token"],
            "attention_density_at_1024": acc["attention_density"]}


def measure_quality(before: Program, after: Program, ctx: int, windows: int,
                    text: str | None = None) -> dict:
    """Perplexity of both programs on the same held-out windows."""
    from rewriter.analysis import quality

    try:
        ids = quality.eval_windows(before.tokenizer, ctx, windows, text=text)
    except ValueError as exc:
        raise RewriterError(f"not enough text for {windows} windows of {ctx} tokens: "
                            f"{exc}") from None
    ppl = [quality.perplexity(quality.logits_fn(p), ids) for p in (before, after)]
    return {"perplexity": ppl, "windows": windows, "ctx": ctx,
            "text": "--text" if text else "pydoc_data.topics (held out)"}


def write_checkpoint(prog: Program, out: Path, *, force: bool, verification=None,
                     onnx: str | None = None, reporter: Reporter | None = None) -> dict:
    """program.pt2 + manifest.json (+ hf/) (+ model.onnx), all in one temporary directory
    beside ``out`` that is renamed into place at the end (see rewriter.checkpoint)."""
    from rewriter.io.atomic import atomic_directory

    reporter = reporter or Reporter(Console(stderr=True, quiet=True))
    result: dict = {}

    def fill(tmp: Path) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is not
        if onnx is not None:
            quiet_onnx()
            with reporter.step(f"exporting ONNX (target {onnx})"):
                rows = prog.export_onnx(tmp / "model.onnx", onnx)
            prog.manifest.setdefault("onnx", {})["path"] = "model.onnx"
            result["onnx"] = rows
        # save() writes its own directory atomically: let it fill a subdirectory of ours,
        # then move its files up; the rename of ``tmp`` publishes everything at once.
        inner = tmp / ".program"
        with reporter.step(f"saving {out}"):
            result["manifest"] = prog.save(inner, verification=verification)
        for entry in inner.iterdir():
            os.replace(entry, tmp / entry.name)
        inner.rmdir()

    atomic_directory(out, force, fill)
    return result


@app.command()
def convert(
    model: ModelArg,
    variant: VariantOpt,
    out: OutDirOpt,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", metavar="FILE", show_default=False,
                     help="A UTF-8 text file to calibrate on (default: pydoc_data text)."),
    ] = None,
    onnx: OnnxTargetOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify",
                           help="Compare the result with MODEL on the example inputs and "
                           "measure perplexity before and after (language models).")] = True,
    force: ForceOpt = False,
    trust_pickle: TrustPickleOpt = False,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    ctx: CtxOpt = 256,
    windows: WindowsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite MODEL's attention with one or more variant specs and write a checkpoint.

    Writes DIR/program.pt2, DIR/manifest.json (sites, specs, parameters and KV-cache bytes
    before and after, verification, perplexity when measured), DIR/hf/ when a transformers
    config expresses the result, and DIR/model.onnx with --onnx. Nothing is written unless
    everything succeeds."""
    import rewriter as rw
    from rewriter.analysis.quality import is_language_model
    from rewriter.io.atomic import check_output_dir
    from rewriter.passes import parse_spec

    err = stderr_console()
    with user_errors(), Reporter(err) as rep:
        # Everything that can be refused is refused before the model is loaded.
        if not variant:
            raise SpecError("give at least one --variant SPEC (e.g. gqa:kv-heads=1)")
        for spec in variant:
            parse_spec(spec)
        _choice(onnx, ONNX_TARGETS, "--onnx")
        check_output_dir(out, force)
        text = _read_text(calib, "--calib")

        before = open_model(model, seq_len, rep, trust_pickle=trust_pickle)
        if text is not None:
            need_tokenizer(before, "--calib FILE")
        with rep.step(f"rewriting: {' + '.join(variant)}"):
            after = rw.rewrite(before, variant, calibration=text, progress=rep.callback)
        report = None
        after.manifest["before"] = {"model": classify(model).reference, **program_facts(before)}
        if verify:
            with rep.step("verifying"):
                report = after.verify(before)
            if before.tokenizer is not None and is_language_model(before):
                with rep.step(f"perplexity before and after ({windows} x {ctx} tokens)"):
                    after.manifest["quality"] = measure_quality(before, after, ctx, windows)
        after.manifest["timings"] = dict(rep.timings)
        result = write_checkpoint(after, out, force=force, verification=report, onnx=onnx,
                                  reporter=rep)

    manifest = result["manifest"]
    if as_json:
        typer.echo(json.dumps({"out": str(out), **manifest}, indent=2, default=str))
        return
    facts = program_facts(before)
    typer.echo(conversion_report(model, variant, facts, manifest, report, result.get("onnx")))
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    typer.echo(f"wrote {out}: {', '.join(files)}")


def conversion_report(model: str, specs: list[str], before: dict, manifest: dict, report,
                      onnx_rows: list | None) -> str:
    pa, pb = before["parameters"], manifest["parameters"]
    ka, kb = before["kv_cache_bytes_per_token"], manifest["kv_cache_bytes_per_token"]
    lines = [f"{model} -> {' + '.join(specs)}",
             f"  sites          {len(before['sites'])} -> {len(manifest['sites'])} "
             f"({sites_line(manifest['sites'])})",
             f"  parameters     {pa:,} -> {pb:,} ({(pb - pa) / max(pa, 1):+.1%})",
             f"  KV cache       {ka:,} -> {kb:,} bytes/token (bf16, {kb / max(ka, 1):.0%})"]
    if report is not None:
        lines.append(f"  verify         max relative error vs {model}: {report.max_rel:.3g} "
                     "(example inputs)")
    quality = manifest.get("quality")
    if quality:
        a, b = quality["perplexity"]
        lines.append(f"  perplexity     {a:.2f} -> {b:.2f} ({quality['windows']} x "
                     f"{quality['ctx']} tokens, held-out text)")
    hf = manifest.get("hf") or {}
    lines.append(f"  hf/            {'written' if hf.get('written') else 'not written'}: "
                 f"{hf.get('reason', '')}")
    if onnx_rows is not None:
        ops: dict[str, int] = {}
        for row in onnx_rows:
            ops[row["op"]] = ops.get(row["op"], 0) + 1
        lines.append(f"  model.onnx     {', '.join(f'{n} x {op}' for op, n in ops.items())}")
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


# ---------------------------------------------------------------------------------------------
# eval


def logits_runner(prog: Program, backend: str, workdir: Path) -> Callable:
    """ids [B, S] -> logits, on eager PyTorch, generated Triton kernels or ONNX Runtime."""
    from rewriter.analysis import quality

    if backend == "eager":
        return quality.logits_fn(prog)
    if backend == "triton":
        return quality.logits_fn(prog.compile("triton"))
    from rewriter import onnx as rwonnx

    path = workdir / "model.onnx"
    quiet_onnx()
    prog.export_onnx(path, "onnx")
    sess = rwonnx.session(path)

    def run(ids):
        args, kwargs = prog.call_with_tokens(ids)
        return rwonnx.run(sess, *args, **kwargs)[0]

    return run


@app.command("eval")
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
    backend: Annotated[
        str, typer.Option("--backend", metavar="eager|triton|ort",
                          help="What runs the program: eager PyTorch, generated Triton "
                          "kernels (needs a GPU), or ONNX Runtime (exported to a temporary "
                          "file).")] = "eager",
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity and tokens/s of MODEL (or a converted DIR) on windows of text."""
    from rewriter.analysis import quality

    err = stderr_console()
    with user_errors(), Reporter(err) as rep:
        _choice(backend, BACKENDS, "--backend")
        body = _read_text(text, "--text")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle)
        tokenizer = need_tokenizer(prog, "eval")
        if not quality.is_language_model(prog):
            raise RewriterError(f"{model} is not a language model (it returns no logits): "
                                "perplexity does not apply")
        try:
            ids = quality.eval_windows(tokenizer, ctx, windows, text=body)
        except ValueError as exc:
            raise RewriterError(f"not enough text for {windows} windows of {ctx} tokens: "
                                f"{exc}") from None
        with tempfile.TemporaryDirectory(prefix="rewriter-eval-") as tmp:
            with rep.step(f"preparing the {backend} backend"):
                try:
                    fn = logits_runner(prog, backend, Path(tmp))
                except RewriterError:
                    raise
                except Exception as exc:
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


# ---------------------------------------------------------------------------------------------
# demo

DEMO_MODEL = "smollm2-135m"
DEMO_SPECS = ["gqa:kv-heads=1", "sparse:window=256,sink=4"]


@app.command()
def demo(
    model: Annotated[str, typer.Option("--model", hidden=True)] = DEMO_MODEL,
    variant: Annotated[list[str] | None, typer.Option("--variant", "-v", hidden=True)] = None,
    ctx: CtxOpt = 512,
    windows: WindowsOpt = 4,
    calib_tokens: Annotated[
        int, typer.Option("--calib-tokens", min=8, metavar="N",
                          help="Calibration: 2 windows of N tokens of pydoc_data text.")] = 128,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="DIR", show_default=False,
                     help="Keep the converted checkpoint here (default: a temporary "
                     "directory, removed at the end)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """End to end on SmolLM2-135M: inspect, convert with GQA (1 KV head) + a sparse
    sliding window with sinks, verify, perplexity before and after, export ONNX and run it in
    ONNX Runtime. Prints a short report (about 3 minutes on 2 CPU cores)."""
    import rewriter as rw
    from rewriter import models
    from rewriter import onnx as rwonnx
    from rewriter.analysis import quality
    from rewriter.io.atomic import check_output_dir

    specs = variant or DEMO_SPECS
    err = stderr_console()
    started = time.perf_counter()
    with user_errors(), Reporter(err) as rep:
        if out is not None:
            check_output_dir(out, force)
        before = open_model(model, DEFAULT_SEQ_LEN, rep)
        tokenizer = need_tokenizer(before, "demo")
        typer.echo(f"inspect   {model}: {len(before.sites)} attention sites "
                   f"({sites_line([s.to_dict() for s in before.sites])}), "
                   f"{before.parameter_count():,} parameters")
        calib = models.token_windows(tokenizer, calib_tokens, 2)
        with rep.step(f"rewriting: {' + '.join(specs)}"):
            after = rw.rewrite(before, specs, calibration=list(calib.split(1)),
                               progress=rep.callback)
        with rep.step("verifying"):
            report = after.verify(before)
        after.manifest["before"] = {"model": classify(model).reference, **program_facts(before)}
        with rep.step(f"perplexity before and after ({windows} x {ctx} tokens)"):
            after.manifest["quality"] = measure_quality(before, after, ctx, windows)
        with tempfile.TemporaryDirectory(prefix="rewriter-demo-") as tmp:
            target = out or Path(tmp) / "converted"
            result = write_checkpoint(after, target, force=force, verification=report,
                                      onnx="onnx", reporter=rep)
            with rep.step("running model.onnx in ONNX Runtime"):
                sess = rwonnx.session(target / "model.onnx")
                ids = quality.eval_windows(tokenizer, ctx, 1)
                args, kwargs = after.call_with_tokens(ids)
                ort_logits = rwonnx.run(sess, *args, **kwargs)[0]
                torch_logits = quality.logits_fn(after)(ids)
                ort_diff = float((ort_logits - torch_logits).abs().max())
                scale = float(torch_logits.abs().max())
    manifest = result["manifest"]
    typer.echo(conversion_report(model, specs, program_facts(before), manifest, report,
                                 result["onnx"]))
    typer.echo(f"  ONNX Runtime   max |ort - torch| on {ctx}-token logits: {ort_diff:.2e} "
               f"(logits up to {scale:.1f})")
    typer.echo(f"  checkpoint     {out if out else '(temporary, removed)'}")
    typer.echo(f"done in {time.perf_counter() - started:.0f} s")


def main() -> None:
    """Entry point of the ``rewriter`` console script."""
    app(prog_name="rewriter")


if __name__ == "__main__":
    sys.exit(main())
