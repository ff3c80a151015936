"""Values that depend on positions only: proving it, then evaluating them.

A mask or bias the modeling code builds from ``arange``s and sizes (a causal mask, a sliding
window, an ALiBi bias) is a function of the sequence length alone. Such a subgraph can be read
as structure: first prove that it reads no activation (``read_structure``), then evaluate it
on example inputs (``evaluate``), at the captured length or at another one
(``resized_inputs``), and compare the value with what a canonical attribute means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from rewriter.ir.graph import ancestors, fetch_attr, val
from rewriter.patterns.graph import SHAPE_ONLY, is_op

aten = torch.ops.aten


class NotProven(Exception):
    """Why a subgraph is not (provably) what was asked. ``quiet``: it is plainly something
    else (a mask holding -inf, a mask read by value), so a site's notes need not say it."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


def read_structure(term: Node, what: str = "value", cumsum: bool = True
                   ) -> tuple[list[Node], set[Node]]:
    """(ancestors in no particular order, the padding-mask inputs read through a cumsum).
    NotProven if ``term`` reads an input's values any other way (or through a cumsum at all,
    when ``cumsum`` is False)."""
    seen: set[Node] = set()
    by_value: set[Node] = set()
    via_cumsum: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(term, False)]
    visited: set[tuple[Node, bool]] = set()
    while stack:
        n, under_cumsum = stack.pop()
        if (n, under_cumsum) in visited:
            continue
        visited.add((n, under_cumsum))
        seen.add(n)
        if n.op == "placeholder":
            (via_cumsum if under_cumsum else by_value).add(n)
            continue
        if n.op == "get_attr":
            continue
        if n.op != "call_function":
            raise NotProven(f"the {what} comes from {n.op} {n.name}")
        if n.target in SHAPE_ONLY:
            # reads only a shape: its inputs still have to be evaluated, not proven
            for a in n.all_input_nodes:
                seen.update(ancestors(a))
            continue
        inner = under_cumsum or (is_op(n, aten.cumsum.default) and n.args[1] in (-1, 1))
        for a in n.all_input_nodes:
            stack.append((a, inner))
    if not cumsum:
        by_value |= via_cumsum
        via_cumsum = set()
    for p in by_value - via_cumsum:
        v = val(p)
        mask_like = isinstance(v, torch.Tensor) and not v.is_floating_point()
        raise NotProven(f"the {what} reads the values of input {p.name}, not only positions",
                        quiet=mask_like)
    for p in via_cumsum:
        v = val(p)
        if not isinstance(v, torch.Tensor) or v.dim() != 2:
            raise NotProven(f"the {what} counts positions over input {p.name}, which is not a "
                            "2-D padding mask")
    return list(seen), via_cumsum


def evaluate(term: Node, gm: GraphModule, inputs: dict[Node, Any], ones: set[Node] = frozenset()):
    """``term``'s value with the placeholders set to ``inputs`` (those in ``ones``: all ones)."""
    needed = ancestors(term)
    env: dict[Node, Any] = {}
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if n not in inputs:
                raise NotProven(f"no example value for input {n.name}")
            x = inputs[n]
            env[n] = torch.ones_like(x) if n in ones else x
        elif n.op == "get_attr":
            env[n] = fetch_attr(gm, n.target)
        elif n.op == "call_function":
            env[n] = n.target(*map_arg(n.args, env.__getitem__),
                              **map_arg(n.kwargs, env.__getitem__))
        else:
            raise NotProven(f"{term.name} comes from {n.op} {n.name}")
        if n is term:
            return env[n]
    raise NotProven(f"{term.name} could not be evaluated")


def resized_inputs(inputs: dict[Node, Any], symbol: torch.SymInt, length: int
                   ) -> dict[Node, Any]:
    """Zero-valued inputs shaped as ``inputs`` but with every dimension that is ``symbol`` set
    to ``length`` (for a subgraph proven to read inputs only through their shapes)."""
    out: dict[Node, Any] = {}
    for node, x in inputs.items():
        v = val(node)
        if not isinstance(x, torch.Tensor) or not isinstance(v, torch.Tensor):
            out[node] = x
            continue
        shape = [length if isinstance(d, torch.SymInt) and str(d) == str(symbol) else n
                 for d, n in zip(v.shape, x.shape, strict=True)]
        out[node] = torch.zeros(shape, dtype=x.dtype)
    return out


__all__ = ["NotProven", "ancestors", "evaluate", "read_structure", "resized_inputs"]
