"""Per-head weights of a site and rebuilding a site with new ones.

Shape glossary: H query heads, Hkv KV heads, D head dim, Dv value head dim, E model width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from rewriter.ir.graph import Emitter, canonical_nodes, fetch_attr, val
from rewriter.ir.site import AttentionSite, Projection
from rewriter.passes.surgery import (
    SurgeryError,
    emit_input,
    emit_output,
    trace_input,
    trace_output,
)

ROLES = ("q", "k", "v")


@dataclass
class HeadWeights:
    """Input projection rows per head: weight [heads, D, E], bias [heads, D] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def select(self, heads) -> HeadWeights:
        idx = torch.as_tensor(list(heads), dtype=torch.long)
        return HeadWeights(self.weight[idx], None if self.bias is None else self.bias[idx])


@dataclass
class OutWeights:
    """Output projection columns per head: weight [E, heads, Dv], bias [E] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def select(self, heads) -> OutWeights:
        idx = torch.as_tensor(list(heads), dtype=torch.long)
        return OutWeights(self.weight[:, idx], self.bias)


def input_heads(gm: GraphModule, proj: Projection) -> HeadWeights:
    w = fetch_attr(gm, proj.weight)
    w = w.t() if proj.kind != "linear" else w  # Conv1D / matmul store [E, out]
    idx = torch.tensor(proj.features, dtype=torch.long)  # [heads, D]
    b = fetch_attr(gm, proj.bias)[idx] if proj.bias else None
    return HeadWeights(w[idx].detach(), None if b is None else b.detach())


def output_heads(gm: GraphModule, proj: Projection) -> OutWeights:
    w = fetch_attr(gm, proj.weight)
    w = w.t() if proj.kind != "linear" else w  # -> [E, in]
    idx = torch.tensor(proj.features, dtype=torch.long)
    b = fetch_attr(gm, proj.bias) if proj.bias else None
    return OutWeights(w[:, idx].detach(), None if b is None else b.detach())


def site_heads(gm: GraphModule, site: AttentionSite) -> dict:
    """{"q": HeadWeights, "k": ..., "v": ..., "o": OutWeights}; SurgeryError if any is unknown."""
    out = {}
    for role in (*ROLES, "o"):
        proj = getattr(site, f"{role}_proj")
        if proj is None:
            raise SurgeryError(f"site {site.index} ({site.module_path}): its {role} projection "
                               "was not found, so its weights cannot be edited")
        out[role] = output_heads(gm, proj) if role == "o" else input_heads(gm, proj)
    return out


def rebuild_site(program, site: AttentionSite, new: dict,
                 query_heads: list[int] | None = None) -> None:
    """Emit new projections for the roles in ``new`` ("q"/"k"/"v": HeadWeights, "o": OutWeights)
    and point the site's canonical node at them. Roles that share a fused weight with a rebuilt
    role are rebuilt too (with their current rows), so the fused weight goes away.

    ``query_heads``: the old query heads, in their new order, when the query heads change; a
    mask with a head dimension (e.g. T5's relative position bias) and ALiBi slopes are gathered
    to match."""
    gm = program.module
    node = canonical_nodes(gm)[site.node]
    rebuilt_weights = {getattr(site, f"{r}_proj").weight for r in new if r in ROLES}
    weights = [getattr(site, f"{r}_proj").weight if getattr(site, f"{r}_proj") else None
               for r in ROLES]
    for role in ROLES:
        proj = getattr(site, f"{role}_proj")
        if role not in new and proj is not None and proj.weight in rebuilt_weights:
            new[role] = input_heads(gm, proj)
    out_chain = trace_output(node) if "o" in new else None
    emit = Emitter(gm)
    emit.meta = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}
    args = list(node.args)
    with gm.graph.inserting_before(node):
        for i, role in enumerate(ROLES):
            if role not in new:
                continue
            proj = getattr(site, f"{role}_proj")
            chain = trace_input(node.args[i])
            hw = new[role]
            heads, dim, width = hw.weight.shape
            # A weight of its own keeps its name (so HF checkpoints line up); a fused one is
            # split into one new parameter per role.
            own = weights.count(proj.weight) == 1 and proj.weight.endswith(".weight")
            name = _prefix(proj.weight) + ("" if own else f"_{role}")
            args[i] = emit_input(gm, emit, chain, hw.weight.reshape(heads * dim, width),
                                 None if hw.bias is None else hw.bias.reshape(-1), dim, name)
            setattr(site, f"{role}_proj", Projection(
                args[i].name, f"{name}.weight", f"{name}.bias" if hw.bias is not None else None,
                "linear", _contiguous(heads, dim), heads * dim))
        mask = args[3] if len(args) > 3 else None
        if query_heads is not None and isinstance(mask, Node) and val(mask).dim() == 4 \
                and val(mask).shape[1] != 1:
            index_name = f"{_prefix(site.o_proj.weight if site.o_proj else site.node)}" \
                "_head_index"
            gm.register_buffer(index_name.replace(".", "_"),
                               torch.tensor(query_heads, dtype=torch.long))
            index = gm.graph.get_attr(index_name.replace(".", "_"))
            index.meta["val"] = emit.fake(fetch_attr(gm, index_name.replace(".", "_")))
            args[3] = emit.call(torch.ops.aten.index_select.default, (mask, 1, index))
    node.args = tuple(args)
    if query_heads is not None and node.kwargs.get("alibi"):
        # ALiBi slopes are per query head: they follow their heads (dropped ones go)
        slopes = [float(node.kwargs["alibi"][h]) for h in query_heads]
        node.kwargs = {**node.kwargs, "alibi": slopes}
        site.alibi = tuple(slopes)
    with emit.fake_mode:
        node.meta["val"] = node.target(*map_arg(node.args, val), **map_arg(node.kwargs, val))
    q, k = (val(a) for a in args[:2])
    site.num_heads, site.num_kv_heads = int(q.shape[1]), int(k.shape[1])
    if out_chain is not None:
        ow = new["o"]
        width, heads, dim = ow.weight.shape
        name = _prefix(site.o_proj.weight)
        with gm.graph.inserting_before(out_chain.projection):
            result = emit_output(gm, emit, out_chain, node, ow.weight.reshape(width, heads * dim),
                                 ow.bias, name)
        site.o_proj = Projection(result.name, f"{name}.weight",
                                 f"{name}.bias" if ow.bias is not None else None, "linear",
                                 _contiguous(heads, dim), heads * dim)


def _prefix(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def _contiguous(heads: int, dim: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(h * dim, (h + 1) * dim)) for h in range(heads))


def node_of(program, site: AttentionSite) -> Node:
    return canonical_nodes(program.module)[site.node]
