"""``rewriter export``: a model to ONNX; a causal LM as one decoder step with a KV cache that
serves prefill and decode (--no-kv-cache: the prefill-only graph)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from rewriter.cli.errors import user_errors
from rewriter.cli.options import (
    DEFAULT_SEQ_LEN,
    ONNX_TARGET_METAVAR,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    SeqLenOpt,
    TrustPickleOpt,
    check_choice,
    onnx_targets,
)
from rewriter.cli.progress import Reporter
from rewriter.cli.render import onnx_ops, stderr_console
from rewriter.cli.sources import open_model


def export(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", "-o", metavar="PATH",
                                     help="Where to write the .onnx file (a PATH.json manifest "
                                     "is written next to it).")],
    target: Annotated[str, typer.Option(
        "--target", metavar=ONNX_TARGET_METAVAR,
        help="onnx: standard ops (opset 23); ort: ONNX Runtime contrib ops "
        "(GroupQueryAttention, MultiHeadAttention) where they express the site.")] = "onnx",
    kv_cache: Annotated[bool | None, typer.Option(
        "--kv-cache/--no-kv-cache", show_default=False,
        help="A decoder step: past_key_N/past_value_N inputs and present_key_N/present_value_N "
        "outputs, checked against the model before export; it serves prefill with an empty "
        "past, so one graph does both (default: for causal LMs; --no-kv-cache for the "
        "prefill-only graph).")] = None,
    logits: Annotated[str, typer.Option(
        "--logits", metavar="all|last",
        help="With a KV cache: every position's logits [B, S, V], or the last position's only "
        "[B, 1, V], which is all generation reads (the LM head then runs on one row: a faster "
        "prefill).")] = "all",
    external_data: Annotated[bool | None, typer.Option(
        "--external-data/--no-external-data", show_default=False,
        help="Weights in PATH.data beside the model (default: when they exceed 1.5 GiB; "
        "protobuf cannot hold 2 GiB).")] = None,
    trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL (a checkpoint, zoo name or saved program) to ONNX with dynamic batch and
    sequence axes."""
    from rewriter.codegen.onnx.export import data_path
    from rewriter.onnx import LOGITS, resolve_kv_cache

    with user_errors(), Reporter(stderr_console()) as rep:
        check_choice(target, onnx_targets(), "--target")
        check_choice(logits, LOGITS, "--logits")
        prog = open_model(model, seq_len, rep, trust_pickle=trust_pickle, dtype=dtype,
                          revision=revision)
        kv_cache = resolve_kv_cache(prog, "auto" if kv_cache is None else kv_cache)
        what = "decoder with KV cache" if kv_cache else "model"
        with rep.step(f"exporting the {what} to {out} (target {target})"):
            rows = prog.export_onnx(out, target, kv_cache=kv_cache, external_data=external_data,
                                    logits=logits)
    if as_json:
        typer.echo(json.dumps({"model": model, "path": out, "target": target,
                               "kv_cache": kv_cache, "logits": logits, "sites": rows},
                              indent=2))
        return
    data = data_path(out)
    typer.echo(f"wrote {out}" + (f" (weights in {data.name})" if data.is_file() else "")
               + f": {len(rows)} attention sites ({onnx_ops(rows)})"
               + (", with a KV cache" if kv_cache else "")
               + (", last position's logits only" if logits == "last" else ""))
