"""`compile_program`: route a program's canonical attention nodes to a backend.

The program is cloned; every canonical node whose site the backend serves is retargeted to the
backend's op (for "triton": ``torch.ops.rewriter.attention_triton``, same signature, so the
graph stays exportable); the others keep running the eager op, with the reason in the site's
notes. The triton backend is inference-only (forward kernels; autograd raises).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rewriter.errors import RewriterError, SpecError

if TYPE_CHECKING:
    from rewriter.program import Program

BACKENDS = ("eager", "triton")


def compile_program(program: Program, backend: str = "triton") -> Program:
    """A new Program whose canonical nodes run on ``backend`` where it can serve them."""
    from rewriter.ir.graph import canonical_nodes

    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r}: unknown (allowed: {', '.join(BACKENDS)})")
    new = program.clone()
    if backend == "eager":
        for site in new.sites:
            site.backend = "eager"
        new.manifest["compile"] = {"backend": "eager"}
        return new

    from rewriter.codegen.triton import BACKEND as TRITON

    ok, why = TRITON.availability()
    if not ok:
        raise RewriterError(f"backend triton is not available: {why}")
    nodes = canonical_nodes(new.module)
    record = {}
    for site in new.sites:
        node = nodes.get(site.node)
        if node is None:
            ok, reason = False, f"canonical node {site.node!r} not in the graph"
        else:
            call = _call_types(node)
            ok, reason = TRITON.supports(site, **call)
        if ok:
            spec = TRITON.kernel_spec(site, **call)
            TRITON.emit(spec)
            node.target = torch.ops.rewriter.attention_triton.default
            site.backend = "triton"
            record[site.index] = {"backend": "triton", "kernel": spec.name, "key": spec.key}
        else:
            site.backend = "eager"
            site.notes.append(f"triton fallback: {reason}")
            record[site.index] = {"backend": "eager", "reason": reason}
    new.module.recompile()
    new.manifest["compile"] = {"backend": "triton", "inference_only": True, "sites": record}
    return new


def _call_types(node) -> dict:
    """dtype and attn_mask kind of a canonical node, from its traced example values."""
    from rewriter.codegen.triton.spec import mask_kind

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
        call["mask"] = mask_kind(mask_val) if mask_val is not None else "float"
    return call
