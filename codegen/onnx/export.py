"""Export a Program to an .onnx file: torch.onnx.export (dynamo) of ``program.module`` with the
rewriter::attention translation, dynamic batch and sequence axes, an atomic write, and a
manifest of which ONNX op each site became (also written next to the file as JSON).

``export_decoder`` does the same for a decoder with a KV cache (rewriter.decoder): inputs
input_ids [batch, sequence] and past_key_<n>/past_value_<n> [batch, Hkv, past_sequence, D],
outputs logits [batch, sequence, vocab] ([batch, 1, vocab] for a decoder built with
``last_logits_only``) and present_key_<n>/present_value_<n> [batch, Hkv, past_sequence +
sequence, D].
A bounded decoder (sink + window caches) also has the input past_length and the output
present_length (int64 scalars), and its bounded presents keep at most ``bound`` positions
(their past axis is ``past_sequence_<bound>``).

Weights over `EXTERNAL_DATA_THRESHOLD` (and any, on request) go to one external-data file
beside the model, ``<name>.onnx.data`` (ONNX's 2 GB protobuf limit): written tensor by tensor
by onnx_ir, checked by path with onnx.checker, and moved into place with the model only once
both are complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from rewriter.codegen.onnx import lean
from rewriter.codegen.onnx.translate import plan, translations
from rewriter.errors import RewriterError, first_line
from rewriter.io.atomic import atomic_file
from rewriter.ir.export import dynamic_shapes_for

TARGETS = ("onnx", "ort")
OPSET = 23  # the first with the standard Attention op
# Initializer bytes above which the weights go to external data: protobuf refuses messages over
# 2 GiB, and the graph and metadata need room besides the weights (torch.onnx uses 1.5 GiB).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


class ExportError(RewriterError):
    """The program could not be exported to ONNX."""


def manifest_path(path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.json"""
    return Path(f"{os.fspath(path)}.json")


def export_program(program, path: str | os.PathLike, target: str = "onnx", *,
                   decompose: bool = False, check: bool = True,
                   external_data: bool | None = None) -> list[dict]:
    """Write ``program`` as ONNX to ``path``; returns the per-site manifest rows
    ({site, node, op, domain, reason}), also written to ``<path>.json``.

    ``decompose``: standard ops only (MatMul/Softmax) instead of the opset-23 Attention op.
    ``external_data``: weights in ``<path>.data`` (None: when they exceed
    EXTERNAL_DATA_THRESHOLD)."""
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r} (allowed: {', '.join(TARGETS)})")
    plans = plan(program.module, {s.node: s for s in program.sites}, target, decompose)
    args, kwargs = tuple(program.example_args), dict(program.example_kwargs)
    model = _to_onnx(program.module, args, kwargs,
                     dynamic_shapes_for(program.module, args, kwargs), plans)
    return _write(model, path, target, plans, check, external_data)["sites"]


def export_decoder(decoder, path: str | os.PathLike, target: str = "onnx", *,
                   decompose: bool = False, check: bool = True,
                   external_data: bool | None = None, metadata: dict | None = None
                   ) -> list[dict]:
    """Write ``decoder`` (rewriter.decoder.Decoder) as ONNX with past/present KV inputs and
    outputs; returns the per-site manifest rows (the manifest JSON also lists the cache).
    ``external_data`` as for `export_program`."""
    from torch.export import Dim

    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r} (allowed: {', '.join(TARGETS)})")
    plans = plan(decoder.module, decoder.sites_by_node, target, decompose)
    # batch stays fixed where the capture pinned it (torch.export specializes a batch of 1)
    batch = Dim.STATIC if decoder.static_batch else Dim("batch")
    seq, past = Dim("sequence"), Dim("past_sequence")
    dims = {"batch": batch, "encoder_sequence": Dim("encoder_sequence")}
    # a bounded cache holds min(P, bound) entries, not P: an axis per bound, so that the
    # file never claims two caches of different lengths share one (codegen/onnx/sizes.py
    # reads equal names as equal sizes)
    bounded = {e.bound: Dim(f"past_sequence_{e.bound}") for e in decoder.cache if e.bound}
    shapes = ({0: batch, 1: seq},
              *({0: batch, 2: bounded[e.bound] if e.bound else past} for e in decoder.cache),
              *([{}] if decoder.bounded else []),  # past_length: a scalar, no dynamic axes
              # attention_mask [B, P + S] of a padded decoder: only its own ops read the
              # length (rewriter.ir.padding), so it gets an axis of its own
              *([{0: batch, 1: Dim("total_sequence")}] if decoder.padded else []),
              # an encoder-decoder's context (cross K/V [B, H, Ssrc, D], its mask)
              *({axis: dims[role] for axis, role in axes.items()}
                for axes in decoder.context_axes()))
    model = _to_onnx(decoder.module, tuple(decoder.example_inputs()), {}, shapes, plans,
                     names=(decoder.input_names, decoder.output_names))
    for key, value in (metadata or {}).items():
        model.metadata_props[key] = str(value)
    cache = [{"input": e.input_name, "output": e.output_name, "kv_heads": e.heads,
              "head_dim": e.head_dim, "sites": list(e.sites), "bound": e.bound}
             for e in decoder.cache]
    return _write(model, path, target, plans, check, external_data, cache=cache,
                  logits="last" if decoder.last_logits else "all",
                  **({"metadata": metadata} if metadata else {}))["sites"]


def encoder_path(path: str | os.PathLike) -> Path:
    """dec.onnx -> dec.encoder.onnx: an encoder-decoder's encoder, beside its decoder step."""
    path = Path(path)
    return path.with_name(f"{path.stem}.encoder{path.suffix or '.onnx'}")


def export_seq2seq(s2s, path: str | os.PathLike, target: str = "onnx", *,
                   decompose: bool = False, check: bool = True,
                   external_data: bool | None = None) -> list[dict]:
    """Write an encoder-decoder (rewriter.seq2seq.Seq2Seq): its decoder step to ``path`` (as
    `export_decoder`, with the context inputs cross_key_<n>/cross_value_<n> [batch, H,
    encoder_sequence, D] and the like) and its encoder to ``encoder_path(path)`` (the
    encoder's inputs -> that context). The step's metadata names the encoder file and the
    decoder start token (rewriter.onnx.session opens both). Returns both files' site rows."""
    from torch.export import Dim

    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r} (allowed: {', '.join(TARGETS)})")
    program = s2s.program
    sites = {s.node: s for s in program.sites}
    plans = plan(s2s.encoder, sites, target, decompose)
    dims = {"batch": Dim("batch"), "encoder_sequence": Dim("encoder_sequence")}
    shapes = tuple({axis: dims[role] for axis, role in axes.items()}
                   for axes in s2s.input_axes)
    model = _to_onnx(s2s.encoder, tuple(s2s.example_inputs()), {}, shapes, plans,
                     names=(list(s2s.encoder_inputs), list(s2s.context)))
    encoder = encoder_path(path)
    rows = _write(model, encoder, target, plans, check, external_data)["sites"]
    metadata = {"rewriter.encoder": encoder.name,
                "rewriter.encoder_inputs": ",".join(s2s.encoder_inputs)}
    if s2s.start_token is not None:
        metadata["rewriter.decoder_start_token_id"] = s2s.start_token
    return rows + export_decoder(s2s.decoder, path, target, decompose=decompose, check=check,
                                 external_data=external_data, metadata=metadata)


def data_path(path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.data (its external data, when it has any)"""
    return Path(f"{os.fspath(path)}.data")


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def _write(model: ir.Model, path: str | os.PathLike, target: str, plans, check: bool,
           external_data: bool | None, **extra) -> dict:
    """Write the model (external data as `export_program` says), check it by path, then move
    it into place with its manifest (``<path>.json``): a reader sees the old files or the
    complete new ones, never a model without its data. The graph is made lean first
    (lean.lower: folded constants, fused normalizations)."""
    lowered = lean.lower(model, target)
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        ir.save(model, tmp / path.name,
                external_data=data_path(path.name).name if external_data else None)
        if check:  # by path: a ModelProto over 2 GiB cannot be checked in memory
            onnx.checker.check_model(str(tmp / path.name))
        if external_data:
            os.replace(data_path(tmp / path.name), data_path(path))
        os.replace(tmp / path.name, path)
        if not external_data:
            data_path(path).unlink(missing_ok=True)  # an earlier export's, now stale
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [p.to_dict() for p in plans]
    document = {"target": target, "opset": OPSET, "inputs": [i.name for i in model.graph.inputs],
                "outputs": [o.name for o in model.graph.outputs], "sites": rows,
                "external_data": data_path(path.name).name if external_data else None,
                "lowered": {k: v for k, v in lowered.items() if v}, **extra}
    atomic_file(manifest_path(path), json.dumps(document, indent=2).encode())
    return document


@contextlib.contextmanager
def _log_level(name: str, level: int):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _decompose_only_when_needed():
    """torch.onnx re-traces the whole program to decompose it for ONNX (run_decompositions:
    about 45% of an export's time on SmolLM2) even when every op of the captured graph has an
    ONNX translation as it is (ATen ops that ONNX implements, the rewriter's own). Skip that
    trace then; run it as before otherwise (in-place ops, ``aten.to``, ops to decompose).
    Every export is checked against the program by the tests, so a graph this lets through
    unchanged and wrong would show."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
    except ImportError:  # another torch layout: leave the exporter as it is
        yield
        return
    original = _fx_passes.decompose_with_registry

    def decompose(exported_program, registry):
        implemented = set(_decomp.get_onnx_implemented_overloads(registry))
        table = _decomp.create_onnx_friendly_decomposition_table(implemented)
        ops = {n.target for n in exported_program.graph.nodes
               if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
        if ops <= implemented - set(table):  # each op translates as it is
            return exported_program
        return exported_program.run_decompositions(table)

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def _to_onnx(module, args: tuple, kwargs: dict, shapes, plans, *,
             names: tuple[list[str], list[str]] | None = None) -> ir.Model:
    """torch.onnx.export with our translations; ``names`` renames the graph inputs and
    outputs (the exporter names them after FX nodes)."""
    table = translations(plans)
    # torch.onnx prints progress lines, warnings and log records (torchvision missing); keep
    # a library call quiet.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
            _log_level("torch.onnx", logging.ERROR), _decompose_only_when_needed():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                custom_translation_table=table, opset_version=OPSET, optimize=False,
                verbose=False)
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"torch.onnx.export failed: {_root_cause(exc)}") from exc
    if names is not None:
        graph = onnx_program.model.graph
        for values, wanted in ((graph.inputs, names[0]), (graph.outputs, names[1])):
            if len(values) != len(wanted):
                raise ExportError(f"exported graph has {len(values)} inputs/outputs where "
                                  f"{len(wanted)} ({', '.join(wanted)}) were expected")
            for value, name in zip(values, wanted, strict=True):
                value.name = name
    return onnx_program.model  # the ONNX IR, its weights still the module's tensors


def _root_cause(exc: BaseException) -> str:
    """The innermost error's first line: the exporter wraps the real reason several times."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = first_line(exc) if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
