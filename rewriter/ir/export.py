"""torch.export, as every layer calls it: dynamic batch and sequence axes, a one-line error,
and the clean-ups an exported graph needs before it is matched or rewritten."""

from __future__ import annotations

import inspect

import torch
from torch.export import Dim
from torch.utils._pytree import tree_map

from rewriter.errors import CaptureError, first_line
from rewriter.ir.graph import cleanup

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
    cleanup(gm, recompile=False)
