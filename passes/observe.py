"""Calibration: run batches through a copy of the program whose canonical nodes call back.

The callback sees every site's q, k, v, mask and attributes and returns the site's output, so
statistics (attention mass, K/V activations, attention maps) are collected in one forward
pass per batch without materializing anything for sites that don't need it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rewriter.ir.graph import canonical_nodes, copy_graph, graph_module_over
from rewriter.ir.ops import with_alibi
from rewriter.passes.base import PassContext
from rewriter.passes.parallel import shard

if TYPE_CHECKING:
    from rewriter.ir.program import GraphProgram as Program

# (site, q, k, v, attn_mask, attrs) -> output
Observer = Callable[[int, Tensor, Tensor, Tensor, "Tensor | None", dict], Tensor]
_OBSERVERS: list[Observer] = []


def observed_attention(q, k, v, attn_mask=None, *, scale, is_causal=False, sparsity="",
                       softcap=0.0, alibi=None, site: int):
    attrs = {"scale": scale, "is_causal": is_causal, "sparsity": sparsity, "softcap": softcap}
    # ALiBi reaches observers as part of an additive mask, so statistics that recompute
    # probabilities from (q, k, mask, attrs) include it
    attn_mask = with_alibi(attn_mask, alibi, q, k.shape[-2])
    return _OBSERVERS[-1](site, q, k, v, attn_mask, attrs)


@contextlib.contextmanager
def observing(fn: Observer) -> Iterator[None]:
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.pop()


def instrumented(program: Program) -> torch.nn.Module:
    """A module like program.module whose site s calls the current observer with site=s."""
    gm = program.module
    graph = copy_graph(gm)
    index = {site.node: site.index for site in program.sites}
    for node in canonical_nodes(graph).values():
        if node.name in index:
            node.target = observed_attention
            node.kwargs = {**node.kwargs, "site": index[node.name]}
    return graph_module_over(gm, graph)


def calibrate(program: Program, ctx: PassContext, observer: Observer, task: str, *,
              data_parallel: bool = False) -> int:
    """Run every calibration batch with ``observer`` watching each site; returns how many
    ran here. ``data_parallel``: only this process's share under torch.distributed
    (rewriter.passes.parallel); the caller then sums its statistics with `all_sum`."""
    module = instrumented(program)
    batches = shard(ctx.batches(program)) if data_parallel else ctx.batches(program)
    with torch.no_grad(), observing(observer):
        for i, (args, kwargs) in enumerate(batches):
            module(*args, **kwargs)
            ctx.report(task, i + 1, len(batches))
    return len(batches)


def default_output(q, k, v, attn_mask, attrs) -> Tensor:
    return torch.ops.rewriter.attention(q, k, v, attn_mask, **attrs)
