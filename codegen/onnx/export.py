"""Export a Program to an .onnx file: torch.onnx.export (dynamo) of ``program.module`` with the
rewriter::attention translation, dynamic batch and sequence axes, an atomic write, and a
manifest of which ONNX op each site became (also written next to the file as JSON)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from rewriter.codegen.onnx.translate import ATTENTION, plan, translation
from rewriter.errors import RewriterError, first_line
from rewriter.frontend import dynamic_shapes_for

TARGETS = ("onnx", "ort")
OPSET = 23  # the first with the standard Attention op


class ExportError(RewriterError):
    """The program could not be exported to ONNX."""


def manifest_path(path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.json"""
    return Path(f"{os.fspath(path)}.json")


def export_program(program, path: str | os.PathLike, target: str = "onnx", *,
                   decompose: bool = False, check: bool = True) -> list[dict]:
    """Write ``program`` as ONNX to ``path``; returns the per-site manifest rows
    ({site, node, op, domain, reason}), also stored in program.manifest["onnx"].

    ``decompose``: standard ops only (MatMul/Softmax) instead of the opset-23 Attention op."""
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r} (allowed: {', '.join(TARGETS)})")
    path = Path(path)
    plans = plan(program, target, decompose)
    model = _to_onnx(program, plans)
    if check:
        onnx.checker.check_model(model)
    rows = [p.to_dict() for p in plans]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, model.SerializeToString())
    document = {"target": target, "opset": OPSET, "inputs": [i.name for i in model.graph.input],
                "outputs": [o.name for o in model.graph.output], "sites": rows}
    _atomic_write(manifest_path(path), json.dumps(document, indent=2).encode())
    program.manifest["onnx"] = {**document, "path": str(path)}
    return rows


def _to_onnx(program, plans) -> onnx.ModelProto:
    module = program.module
    args, kwargs = tuple(program.example_args), dict(program.example_kwargs)
    shapes = dynamic_shapes_for(module, args, kwargs)
    table = {ATTENTION: translation(plans)}
    # torch.onnx prints progress lines and warnings; keep a library call quiet.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                custom_translation_table=table, opset_version=OPSET, optimize=False,
                verbose=False)
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"torch.onnx.export failed: {_root_cause(exc)}") from exc
    return onnx_program.model_proto


def _root_cause(exc: BaseException) -> str:
    """The innermost error's first line: the exporter wraps the real reason several times."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = first_line(exc) if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``: a reader
    never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
