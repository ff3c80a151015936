"""``rewriter convert``: rewrite a model's attention with variant specs and save the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rewriter.cli.errors import user_errors
from rewriter.cli.options import (
    DEFAULT_SEQ_LEN,
    CtxOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelArg,
    OnnxTargetOpt,
    OutDirOpt,
    RevisionOpt,
    SeqLenOpt,
    TrustPickleOpt,
    VariantOpt,
    WindowsOpt,
    check_choice,
    onnx_targets,
    read_text,
)
from rewriter.cli.progress import Reporter
from rewriter.cli.render import conversion_report, stderr_console
from rewriter.cli.sources import classify, need_tokenizer, open_model
from rewriter.errors import SpecError


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
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
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
    from rewriter.analysis.accounting import program_facts
    from rewriter.analysis.quality import is_language_model, perplexity_change
    from rewriter.io.atomic import check_output_dir
    from rewriter.passes import parse_spec

    with user_errors(), Reporter(stderr_console()) as rep:
        # Everything that can be refused is refused before the model is loaded.
        if not variant:
            raise SpecError("give at least one --variant SPEC (e.g. gqa:kv-heads=1)")
        for spec in variant:
            parse_spec(spec)
        check_choice(onnx, onnx_targets(), "--onnx")
        check_output_dir(out, force)
        text = read_text(calib, "--calib")

        before = open_model(model, seq_len, rep, trust_pickle=trust_pickle, dtype=dtype,
                          revision=revision)
        if text is not None:
            need_tokenizer(before, "--calib FILE")
        with rep.step(f"rewriting: {' + '.join(variant)}"):
            after = rw.rewrite(before, variant, calibration=text, progress=rep.callback)
        report = None
        facts = program_facts(before)
        after.manifest["before"] = {"model": classify(model).reference, **facts}
        if verify:
            with rep.step("verifying"):
                report = after.verify(before)
            if before.tokenizer is not None and is_language_model(before):
                with rep.step(f"perplexity before and after ({windows} x {ctx} tokens)"):
                    after.manifest["quality"] = perplexity_change(before, after, ctx, windows)
        after.manifest["timings"] = dict(rep.timings)
        with rep.step(f"saving {out}" + (f" with model.onnx (target {onnx})" if onnx else "")):
            manifest = after.save(out, force=force, verification=report, onnx=onnx)

    if as_json:
        typer.echo(json.dumps({"out": str(out), **manifest}, indent=2, default=str))
        return
    rows = manifest["onnx"]["sites"] if onnx is not None else None
    typer.echo(conversion_report(model, variant, facts, manifest, report, rows))
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    typer.echo(f"wrote {out}: {', '.join(files)}")
