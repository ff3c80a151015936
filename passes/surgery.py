"""Projection surgery: rebuild a site's q/k/v input or its output projection with new weights
and a new head count, whatever layout the model wrote.

Weight-editing passes (GQA conversion, head pruning) compute new weights per head and call
these helpers, which emit, right before the canonical node::

    x -> linear(x, W', b') -> view [..., N, D] -> permute to [B, N, S, D] -> positional copy

(the model's own RoPE subgraph, copied onto the new tensor) and, after it::

    out [B, N, S, Dv] -> permute to the token layout -> [..., N*Dv] -> linear(W_o', b_o')

The old projection chain then has no users and is removed with its parameters, so fused QKV
projections come out un-fused, and head-count constants in the model's views never matter.

Shape glossary: B batch, S sequence, E model width, N new heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from rewriter.errors import RewriterError
from rewriter.ir.graph import Emitter, concrete, fetch_attr
from rewriter.patterns.graph import shape
from rewriter.patterns.layout import apply_node, iota, is_layout
from rewriter.patterns.projections import (
    InputWalk,
    output_projection,
    projection_input,
    walk_to_projection,
)

aten = torch.ops.aten


class SurgeryError(RewriterError):
    """A site whose projections cannot be rebuilt (the reason says which part)."""


@dataclass
class InputChain:
    """How a canonical operand [B, H, S, D] is produced from hidden states."""

    projection: Node
    source: Node  # the hidden states [L0, L1, E] the projection reads
    token_perm: tuple[int, ...]  # [L0, L1, H, D] -> [B, H, S, D]
    units: list[tuple[Node, Node]]  # positional transforms (output, input), projection side first
    rescales: list[Node]  # constant multiplies on the way (pre-scaled q)


def trace_input(operand: Node) -> InputChain:
    """Walk from a canonical operand back to its projection; check what can be rebuilt."""
    walk = walk_to_projection(operand)
    if walk.projection is None:
        raise SurgeryError(f"{operand.name} is not a projection followed by layout ops "
                           f"and positional transforms ({walk.stopped.name} is neither)")
    projection, units = walk.projection, [(out, inp) for out, inp, _ in walk.units]
    for out, inp in units:
        if tuple(shape(inp)) != tuple(shape(out)) or len(shape(out)) != 4:
            raise SurgeryError(f"positional transform {out.name} is not applied in [B, H, S, D]")
    source = projection_input(projection)
    lead = concrete(shape(source))[:-1]
    if projection.target is not aten.linear.default:
        # Conv1D-style addmm(b, x.view(-1, E), W): read the 3-D hidden states before the view
        if len(lead) == 1 and is_layout(source) and len(shape(source.args[0])) == 3:
            source = source.args[0]
            lead = concrete(shape(source))[:-1]
    if len(lead) != 2:
        raise SurgeryError(f"projection {projection.name} reads a rank-{len(lead) + 1} input")
    token_perm = _token_perm(walk, tuple(lead))
    return InputChain(projection, source, token_perm, units, walk.rescales)


def _token_perm(walk: InputWalk, lead: tuple[int, int]) -> tuple[int, ...]:
    """Which of the source's two leading dims is the batch and which the sequence."""
    index = walk.index()
    if index.dim() != 4:
        raise SurgeryError("operand is not 4-D")
    feature = concrete(shape(walk.projection))[-1]
    token = index // feature  # flat token id in the projection output's leading dims
    l0, l1 = token // lead[1], token % lead[1]
    b = torch.arange(index.shape[0]).view(-1, 1, 1, 1).expand_as(index)
    s = torch.arange(index.shape[2]).view(1, 1, -1, 1).expand_as(index)
    if torch.equal(l0, b) and torch.equal(l1, s):
        return (0, 2, 1, 3)  # [B, S, N, D] -> [B, N, S, D]
    if torch.equal(l0, s) and torch.equal(l1, b):
        return (1, 2, 0, 3)  # [S, B, N, D] -> [B, N, S, D]
    raise SurgeryError("cannot tell batch from sequence in the projection's input")


def set_parameter(gm: GraphModule, name: str, tensor: torch.Tensor) -> None:
    """Install ``tensor`` at a qualified name, creating submodules as needed."""
    *owners, attr = name.split(".")
    module: nn.Module = gm
    for part in owners:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if hasattr(module, attr) and not isinstance(getattr(module, attr), torch.Tensor):
        raise SurgeryError(f"cannot place a parameter at {name}: it is a module")
    if attr in module._parameters or attr in module._buffers or not hasattr(module, attr):
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)
        module.register_parameter(attr, nn.Parameter(tensor.detach(), requires_grad=False))


def _get_attr(gm: GraphModule, emit: Emitter, name: str) -> Node:
    node = emit.graph.get_attr(name)
    node.meta["val"] = emit.fake(fetch_attr(gm, name))
    return node


def emit_input(gm: GraphModule, emit: Emitter, chain: InputChain, weight: torch.Tensor,
               bias: torch.Tensor | None, head_dim: int, name: str) -> Node:
    """New canonical operand [B, N, S, D] from ``weight`` [N*D, E] (and ``bias`` [N*D])."""
    set_parameter(gm, f"{name}.weight", weight)
    w = _get_attr(gm, emit, f"{name}.weight")
    args: tuple = (chain.source, w)
    if bias is not None:
        set_parameter(gm, f"{name}.bias", bias)
        args = (*args, _get_attr(gm, emit, f"{name}.bias"))
    out = emit.call(aten.linear.default, args)
    out = emit.call(aten.unflatten.int, (out, -1, [-1, head_dim]))
    out = emit.call(aten.permute.default, (out, list(chain.token_perm)))
    for node in chain.rescales:
        out = emit.call(node.target, (out, *node.args[1:]), dict(node.kwargs))
    for unit_out, unit_in in chain.units:
        out = _copy_subgraph(emit, unit_in, unit_out, out)
    return out


def _copy_subgraph(emit: Emitter, start: Node, end: Node, replacement: Node) -> Node:
    """Copy the nodes between ``start`` and ``end`` (RoPE: mul, slice, neg, cat, add) with
    ``start`` replaced, reusing every other input (cos, sin)."""
    inside = nodes_between(start, end)
    env = {start: replacement}
    for node in start.graph.nodes:  # graph order is a topological order
        if node in inside:
            args = torch.fx.node.map_arg(node.args, lambda n: env.get(n, n))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env.get(n, n))
            env[node] = emit.call(node.target, args, kwargs)
    return env[end]


def nodes_between(start: Node, end: Node) -> set[Node]:
    """Nodes on some path start -> end (excluding start)."""
    ancestors, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n in ancestors or n is start:
            continue
        ancestors.add(n)
        stack.extend(n.all_input_nodes)
    descendants, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in descendants and u in ancestors:
                descendants.add(u)
                stack.append(u)
    return descendants


@dataclass
class OutputChain:
    projection: Node  # o_proj
    merged: Node  # its input: the heads merged back into tokens
    token_perm: tuple[int, ...]  # [B, N, S, Dv] -> [L0, L1, N, Dv]
    flat_tokens: bool  # the projection reads [L0*L1, F] (Conv1D style)


def trace_output(canonical: Node) -> OutputChain:
    """From the canonical node's result through the head merge to the output projection."""
    found = output_projection(canonical)
    if found is None:
        raise SurgeryError(f"the output of {canonical.name} does not reach an output projection "
                           "through layout ops only")
    projection, down = found
    last = down[-1]
    dims = concrete(shape(canonical))
    index = iota(canonical)
    for n in down[1:]:
        index = apply_node(n, index)
    if index.dim() not in (2, 3):
        raise SurgeryError("the head merge does not produce tokens x features")
    b, _h, s, _d = torch.unravel_index(index, tuple(dims))
    flat = index.dim() == 2
    if flat:  # [L0*L1, F]: one token id per row
        row = torch.arange(index.shape[0]).view(-1, 1).expand_as(index)
        candidates = {(0, 2, 1, 3): b * dims[2] + s, (2, 0, 1, 3): s * dims[0] + b}
        for perm, token in candidates.items():
            if torch.equal(token, row):
                return OutputChain(projection, last, perm, True)
    else:
        l0 = torch.arange(index.shape[0]).view(-1, 1, 1).expand_as(index)
        l1 = torch.arange(index.shape[1]).view(1, -1, 1).expand_as(index)
        if torch.equal(b, l0) and torch.equal(s, l1):
            return OutputChain(projection, last, (0, 2, 1, 3), False)
        if torch.equal(s, l0) and torch.equal(b, l1):
            return OutputChain(projection, last, (2, 0, 1, 3), False)
    raise SurgeryError("cannot tell batch from sequence in the output projection's input")


def emit_output(gm: GraphModule, emit: Emitter, chain: OutputChain, out: Node,
                weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> Node:
    """out [B, N, S, Dv] -> the output projection with ``weight`` [E, N*Dv]; replaces the old
    projection's uses and returns the new result node."""
    set_parameter(gm, f"{name}.weight", weight)
    w = _get_attr(gm, emit, f"{name}.weight")
    x = emit.call(aten.permute.default, (out, list(chain.token_perm)))
    x = emit.call(aten.flatten.using_ints, (x, -2, -1))
    if chain.flat_tokens:
        x = emit.call(aten.flatten.using_ints, (x, 0, 1))
    args: tuple = (x, w)
    if bias is not None:
        set_parameter(gm, f"{name}.bias", bias)
        args = (*args, _get_attr(gm, emit, f"{name}.bias"))
    result = emit.call(aten.linear.default, args)
    chain.projection.replace_all_uses_with(result)
    return result
