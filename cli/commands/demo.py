"""``rewriter demo``: inspect, convert, verify, measure and run in ONNX Runtime, end to end on
SmolLM2-135M."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from rewriter.cli.errors import user_errors
from rewriter.cli.options import DEFAULT_SEQ_LEN, CtxOpt, ForceOpt, WindowsOpt
from rewriter.cli.progress import Reporter
from rewriter.cli.render import conversion_report, sites_line, stderr_console
from rewriter.cli.sources import classify, need_tokenizer, open_model

DEMO_MODEL = "smollm2-135m"
DEMO_SPECS = ["gqa:kv-heads=1", "sparse:window=256,sink=4"]
DEMO_HEAL = "heal:objective=kd,steps=8"
HEAL_WINDOWS = 8  # calibration windows of --ctx tokens for heal (from the text's start)


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
    heal: Annotated[
        str, typer.Option("--heal", metavar="SPEC",
                          help="The heal spec applied after the conversion ('' to skip).")
    ] = DEMO_HEAL,
    force: ForceOpt = False,
) -> None:
    """End to end on SmolLM2-135M: inspect, convert with GQA (1 KV head) + a sparse
    sliding window with sinks, heal it toward the original, verify, perplexity before and
    after, export ONNX and run it in ONNX Runtime. Prints a short report (about 2 minutes on
    2 CPU cores)."""
    import rewriter as rw
    from rewriter import models
    from rewriter import onnx as rwonnx
    from rewriter.analysis import quality
    from rewriter.analysis.accounting import program_facts
    from rewriter.io.atomic import check_output_dir

    specs = variant or DEMO_SPECS
    started = time.perf_counter()
    with user_errors(), Reporter(stderr_console()) as rep:
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
        unhealed = after
        if heal:
            heal_calib = models.token_windows(tokenizer, ctx, HEAL_WINDOWS)
            after = rw.rewrite(after, heal, calibration=list(heal_calib.split(1)),
                               progress=rep.callback)
            specs = [*specs, heal]
        with rep.step("verifying"):
            report = after.verify(before)
        facts = program_facts(before)
        after.manifest["before"] = {"model": classify(model).reference, **facts}
        with rep.step(f"perplexity before and after ({windows} x {ctx} tokens)"):
            change = quality.perplexity_change(before, after, ctx, windows)
            if heal:
                ids = quality.held_out_windows(tokenizer, ctx, windows)
                change["unhealed"] = quality.perplexity(quality.logits_fn(unhealed), ids)
            after.manifest["quality"] = change
        with tempfile.TemporaryDirectory(prefix="rewriter-demo-") as tmp:
            target = out or Path(tmp) / "converted"
            with rep.step(f"saving {target} with model.onnx (target onnx)"):
                manifest = after.save(target, force=force, verification=report, onnx="onnx")
            with rep.step("running model.onnx in ONNX Runtime"):
                sess = rwonnx.session(target / "model.onnx")
                ids = quality.eval_windows(tokenizer, ctx, 1)
                args, kwargs = after.call_with_tokens(ids)
                ort_logits = rwonnx.run(sess, *args, **kwargs)[0]
                torch_logits = quality.logits_fn(after)(ids)
                ort_diff = float((ort_logits - torch_logits).abs().max())
                scale = float(torch_logits.abs().max())
    typer.echo(conversion_report(model, specs, facts, manifest, report,
                                 manifest["onnx"]["sites"]))
    typer.echo(f"  ONNX Runtime   max |ort - torch| on {ctx}-token logits: {ort_diff:.2e} "
               f"(logits up to {scale:.1f})")
    typer.echo(f"  checkpoint     {out if out else '(temporary, removed)'}")
    typer.echo(f"done in {time.perf_counter() - started:.0f} s")
