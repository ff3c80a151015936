"""Numeric checks that tell a wrong transform from rounding, whatever the CPU.

Two correct fp32 graphs differ by rounding that depends on the summation order (the CPU, the
thread count, the kernel chosen): about 1e-7 relative per op, compounding to 1e-4 and more over
30 layers of a poorly conditioned model (an MQA conversion of SmolLM2). A wrong position, mask
or weight shows at 1e-3 and more. The two overlap in fp32, so a check that gates an output
re-runs both sides in float64: the graph's dtype constants (``_to_copy(dtype=float32)`` of an
RMSNorm, ``full(..., dtype=float32)`` of a mask) and its floating parameters are promoted, the
rounding falls to about 1e-15, and ``EXACT_TOLERANCE`` sits between the two with orders of
magnitude to spare on each side.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_leaves, tree_map

from rewriter.ir.graph import copy_graph, graph_module_over

__all__ = ["EXACT_TOLERANCE", "float64_module", "rounding_noise", "to_float64"]

# Relative error a float64 comparison of two equivalent graphs stays below (measured: 2e-12
# for the MQA conversion of SmolLM2, 5e-15 dense); a wrong surgery is above 1e-4.
EXACT_TOLERANCE = 1e-8

_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _promote_dtype(x: Any) -> Any:
    return torch.float64 if isinstance(x, torch.dtype) and x in _NARROW else x


def to_float64(tree: Any) -> Any:
    """Floating tensors in a pytree (args, kwargs) as float64; everything else unchanged."""
    return tree_map(lambda x: x.double() if isinstance(x, torch.Tensor)
                    and x.is_floating_point() else x, tree)


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (a zero ``want`` counts as 1e-30): how the exactness
    checks (rewriter.decoder, rewriter.seq2seq) measure a rewrite against its reference."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def float64_module(module: torch.nn.Module, shared: dict[int, Any] | None = None
                   ) -> torch.nn.Module:
    """``module`` computing in float64. A GraphModule gets a promoted copy of its graph over
    float64 copies of its floating tensors; ``shared`` maps id(tensor) to its copy, so modules
    over the same weights (a program and its decoder) share one float64 set. Any other module
    is deep-copied and cast (its own casts to fp32, if any, stay)."""
    if not isinstance(module, GraphModule):
        return copy.deepcopy(module).double()
    shared = {} if shared is None else shared
    graph = copy_graph(module)
    for node in graph.nodes:
        node.args = map_aggregate(node.args, _promote_dtype)
        node.kwargs = map_aggregate(node.kwargs, _promote_dtype)

    def convert(obj: Any) -> Any:
        if id(obj) not in shared:
            if isinstance(obj, GraphModule):  # a higher-order op's subgraph
                shared[id(obj)] = float64_module(obj, shared)
            elif isinstance(obj, torch.Tensor) and obj.is_floating_point():
                shared[id(obj)] = obj.detach().double()
            else:
                return obj
        return shared[id(obj)]

    promoted = graph_module_over(module, graph, convert)
    promoted.recompile()
    return promoted


def rounding_noise(module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None
                   ) -> float:
    """Max relative difference, over floating outputs, between ``module`` run as it is and in
    float64 on the same inputs: the rounding level of this computation in its own dtype, the
    floor below which no comparison of two correct code paths can be held."""
    kwargs = kwargs or {}
    with torch.no_grad():
        low = module(*args, **kwargs)
        args64, kwargs64 = to_float64((args, kwargs))
        high = float64_module(module)(*args64, **kwargs64)
    worst = 0.0
    for a, b in zip(tree_leaves(low), tree_leaves(high), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel():
            scale = float(b.abs().max())
            worst = max(worst, float((a.double() - b).abs().max()) / (scale or 1.0))
    return worst
