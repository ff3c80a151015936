"""Frontend: capture an nn.Module as a torch.fx graph through torch.export (non-strict), then
canonicalize every attention."""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from torch.export import Dim
from torch.utils._pytree import tree_map

import rewriter.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.errors import CaptureError, NoAttentionError, first_line
from rewriter.patterns.graph import copy_graph, graph_module_from

aten = torch.ops.aten


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Dim.AUTO on the first two dims of every tensor input (batch and sequence, or batch and
    channels: export specializes whatever the model pins)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(min(x.dim(), 2))}
        return None

    out = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(tree_map(spec, v) for v in value)
        else:
            out[name] = tree_map(spec, value)
    return out


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None, dynamic: bool):
    """torch.export.export (non-strict) with a one-line error carrying export's reason."""
    kwargs = dict(kwargs or {})
    shapes = dynamic_shapes_for(model, args, kwargs) if dynamic else None
    try:
        return torch.export.export(model, tuple(args), kwargs=kwargs, strict=False,
                                   dynamic_shapes=shapes)
    except Exception as exc:  # export raises many types; they all mean "cannot capture"
        reason = first_line(exc)
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                           f"{type(exc).__name__}: {reason}") from exc


def strip_runtime_asserts(gm: torch.fx.GraphModule) -> None:
    """Export leaves dtype assertions on tensors; they only re-check what tracing proved, and as
    side-effecting users they would keep rewritten subgraphs alive."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)


def remove_dead_code(gm: torch.fx.GraphModule) -> None:
    """Export keeps values nobody reads (attention weights a wrapper drops, unused outputs of
    rotary caches); removing them first means a pattern sees only live uses."""
    from rewriter.passes.canonicalize import cleanup

    cleanup(gm, recompile=False)


def capture(
    model: torch.nn.Module,
    args: tuple | Any = (),
    kwargs: dict | None = None,
    dynamic: bool = True,
    *,
    require_attention: bool = True,
):
    """Capture ``model`` called as ``model(*args, **kwargs)``; find and canonicalize attention.

    Returns a `Program` whose ``module`` has the model's call signature and runs every attention
    through ``torch.ops.rewriter.attention``."""
    from rewriter.passes.canonicalize import canonicalize
    from rewriter.patterns.core import find
    from rewriter.program import Program

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
        matches, rejected = find(gm)
        if not matches and require_attention:
            raise NoAttentionError(
                f"no attention found in {type(model).__name__}"
                + (f" ({len(rejected)} softmax(es) rejected; see `rewriter inspect --explain`)"
                   if rejected else ""), rejected)
        sites = canonicalize(gm, matches)
        timings["find_canonicalize_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    program = Program(module=gm, original=lambda: graph_module_from(gm, original_graph),
                      sites=sites, rejected=rejected, example_args=args,
                      example_kwargs=dict(kwargs or {}),
                      manifest={"source": type(model).__name__, "timings": timings,
                                "passes": [{"spec": "canonicalize", "sites": len(sites)}]})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        program.hf_config = config  # lets save() write a transformers checkpoint when it fits
    return program
