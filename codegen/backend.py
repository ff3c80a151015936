"""The backend contract and its one registry.

A backend runs the canonical attention op. Each is a folder of this package whose
``__init__`` registers one object with `register_backend`:

    name                     "eager", "triton", "ort"
    summary                  one line for help texts
    op                       the op a lowered canonical node calls (None: the backend runs an
                             exported file outside torch, as ONNX Runtime does)
    available()              (ok, reason): can it run on this machine
    supports(site, **call)   (ok, reason): can it serve this site (call: dtype=, mask=, ... read
                             from the graph); unserved sites stay on the eager op
    lower_site(site, **call) prepare one served site (e.g. emit its kernel); returns its record
    runner(program, workdir) a callable with the program's call convention running it here

`compile_program` (Program.compile) and `runner` (``rewriter eval --backend``) go through the
registry, and so does the summary's backend column (each site records the backend that runs
it). Adding a backend is one new folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rewriter.errors import RewriterError, SpecError
from rewriter.ir.graph import canonical_nodes


class Backend(Protocol):
    name: str
    summary: str
    op: Any

    def available(self) -> tuple[bool, str]: ...

    def supports(self, site, **call) -> tuple[bool, str]: ...

    def lower_site(self, site, **call) -> dict: ...

    def runner(self, program, workdir: Path) -> Callable[..., Any]: ...


class BackendUnavailable(RewriterError):
    """The backend cannot run on this machine (the message says why)."""


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str, *, require_available: bool = True) -> Backend:
    """The registered backend ``name``; a one-line error when unknown or (by default) when it
    cannot run here."""
    if name not in BACKENDS:
        raise SpecError(f"backend {name!r}: unknown (allowed: {', '.join(BACKENDS)})")
    backend = BACKENDS[name]
    if require_available:
        ok, why = backend.available()
        if not ok:
            raise BackendUnavailable(f"backend {name} is not available: {why}")
    return backend


def compile_program(program, name: str):
    """A clone of ``program`` whose canonical nodes run on backend ``name`` where it serves
    them; the others keep the eager op, with the reason in their site's notes. The record of
    what ran where is in the clone's manifest["compile"]."""
    backend = get_backend(name)
    if backend.op is None:
        raise SpecError(f"backend {name} runs an exported file, not a torch graph: use "
                        f"Program.export_onnx, or runner(program, {name!r}, workdir)")
    new = program.clone()
    nodes = canonical_nodes(new.module)
    record = {}
    for site in new.sites:
        node = nodes.get(site.node)
        if node is None:
            ok, reason, call = False, f"canonical node {site.node!r} not in the graph", {}
        else:
            call = call_types(node)
            ok, reason = backend.supports(site, **call)
        if ok:
            record[site.index] = {"backend": name, **backend.lower_site(site, **call)}
            node.target = backend.op
            site.backend = name
        else:
            site.backend = "eager"
            site.notes.append(f"{name} fallback: {reason}")
            record[site.index] = {"backend": "eager", "reason": reason}
    new.module.recompile()
    new.manifest["compile"] = {"backend": name, "sites": record}
    return new


def runner(program, name: str, workdir: Path) -> Callable[..., Any]:
    """``program`` run by backend ``name``: a callable taking the program's (args, kwargs)
    and returning its outputs (files it needs, such as an exported model, go in ``workdir``)."""
    return get_backend(name).runner(program, Path(workdir))


def call_types(node) -> dict:
    """dtype, attn_mask kind and attributes of a canonical node, from its traced values."""
    args = list(node.args) + [None] * (4 - len(node.args))
    q, mask = args[0], node.kwargs.get("attn_mask", args[3])
    call = {key: node.kwargs[key] for key in ("sparsity", "is_causal", "softcap")
            if key in node.kwargs}
    q_val = q.meta.get("val") if hasattr(q, "meta") else None
    if q_val is not None:
        call["dtype"] = q_val.dtype
    mask_val = mask.meta.get("val") if hasattr(mask, "meta") else None
    if mask is None:
        call["mask"] = "none"
    else:  # without a traced value, assume the general case (the kernel is picked per call)
        is_bool = mask_val is not None and mask_val.dtype == torch.bool
        call["mask"] = "bool" if is_bool else "float"
    return call
