"""Frontend: capture an nn.Module as a torch.fx graph through torch.export (non-strict), then
canonicalize every attention."""

from __future__ import annotations

import time
from typing import Any

import torch

from rewriter.errors import NoAttentionError
from rewriter.ir.export import export, remove_dead_code, strip_runtime_asserts
from rewriter.ir.graph import copy_graph, graph_module_over
from rewriter.passes.canonicalize import canonicalize
from rewriter.patterns.core import find
from rewriter.program import Program


def capture(
    model: torch.nn.Module,
    args: tuple | Any = (),
    kwargs: dict | None = None,
    dynamic: bool = True,
    *,
    require_attention: bool = True,
) -> Program:
    """Capture ``model`` called as ``model(*args, **kwargs)``; find and canonicalize attention.

    Returns a `Program` whose ``module`` has the model's call signature and runs every attention
    through ``torch.ops.rewriter.attention``."""
    if not isinstance(args, tuple):
        args = (args,)
    was_training = model.training
    model.eval()
    timings = {}
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = export(model, args, kwargs, dynamic)
        timings["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gm = ep.module()
        strip_runtime_asserts(gm)
        remove_dead_code(gm)
        # The pre-canonicalization graph; its GraphModule (and generated code) is built on
        # first use of Program.original, as most callers never run it.
        original_graph = copy_graph(gm)
        matches, rejected = find(gm, inputs=example_inputs(gm, args, kwargs))
        if not matches and require_attention:
            raise NoAttentionError(
                f"no attention found in {type(model).__name__}"
                + (f" ({len(rejected)} softmax(es) rejected; see `rewriter inspect --explain`)"
                   if rejected else ""), rejected)
        sites = canonicalize(gm, matches)
        timings["find_canonicalize_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    program = Program(module=gm, original=lambda: graph_module_over(gm, original_graph),
                      sites=sites, rejected=rejected, example_args=args,
                      example_kwargs=dict(kwargs or {}),
                      manifest={"source": type(model).__name__, "timings": timings,
                                "passes": [{"spec": "canonicalize", "sites": len(sites)}]})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        program.hf_config = config  # lets save() write a transformers checkpoint when it fits
    return program


def example_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None) -> dict:
    """{placeholder: example value} of an exported module (empty if they do not line up)."""
    import torch.fx._pytree as fx_pytree

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    spec = getattr(gm, "_in_spec", None)
    try:
        flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs or {})), spec) \
            if spec is not None else None
    except Exception:  # an unusual input tree: ALiBi stays an opaque bias
        return {}
    if flat is None or len(flat) != len(placeholders):
        return {}
    return dict(zip(placeholders, flat, strict=True))
