"""Layout normalization of the core's operands: bmm on [B*H, S, D] (heads found by index
propagation with a static batch, or from the symbolic size with a dynamic one), einsum with any
labels, ellipsis einsum; einsums that are not ``q @ k^T``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import (
    SHAPES,
    Attn,
    D,
    H,
    assert_numeric,
    capture,
    hidden,
    only_site,
    rejection_reasons,
)
from torch.export import Dim

from rewriter.patterns.graph import MatchFailure
from rewriter.patterns.layout import heads_of_flat_batch

SCALE = D**-0.5


def bmm_core(q, k, v):
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    p = F.softmax(torch.bmm(q3, k3.transpose(1, 2)) * SCALE, dim=-1)
    return torch.bmm(p, v3).view(b, h, s, d)


def bmm_mask_core(q, k, v):
    """A [B*H, S, S] additive causal mask added to bmm scores."""
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1).expand(b * h, s, s)
    p = F.softmax(torch.bmm(q3, k3.transpose(1, 2)) * SCALE + mask, dim=-1)
    return torch.bmm(p, v3).view(b, h, s, d)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("batch", [2, 1])
def test_bmm_flat_heads(dynamic, batch):
    model = Attn(bmm_core)
    prog = capture(model, hidden(batch, 5), dynamic=dynamic)
    site = only_site(prog)
    assert site.pattern == "bmm-softmax"
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, H, D)
    assert site.q_proj.weight == "q_proj.weight" and site.o_proj.weight == "o_proj.weight"
    # Export specializes a batch of 1 (0/1 specialization): vary only the length then.
    shapes = SHAPES if dynamic and batch > 1 else [(batch, 5)]
    if dynamic and batch == 1:
        shapes = [(1, 5), (1, 9), (1, 12)]
    assert_numeric(prog, model, shapes=shapes)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_bmm_flat_mask(dynamic):
    model = Attn(bmm_mask_core)
    prog = capture(model, hidden(*SHAPES[0]), dynamic=dynamic)
    assert only_site(prog).mask == "causal-mask"
    assert_numeric(prog, model, shapes=SHAPES if dynamic else SHAPES[:1])


def test_heads_of_flat_batch_dynamic_and_static():
    def run(dynamic):
        model = Attn(bmm_core)
        x = hidden(3, 5)
        shapes = {"x": {0: Dim.AUTO, 1: Dim.AUTO}} if dynamic else None
        gm = torch.export.export(model, (x,), dynamic_shapes=shapes).module()
        bmm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.bmm.default)
        return heads_of_flat_batch(bmm.args[0])

    assert run(True) == H
    assert run(False) == H


def test_heads_of_flat_batch_heads_outer_is_rejected():
    """[H*B, S, D] (heads outer, batch inner) is not a [B*H] flattening."""

    def core(q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.transpose(0, 1).reshape(h * b, s, d) for t in (q, k, v))
        p = F.softmax(torch.bmm(q3, k3.transpose(1, 2)) * SCALE, dim=-1)
        return torch.bmm(p, v3).view(h, b, s, d).transpose(0, 1)

    gm = torch.export.export(Attn(core), (hidden(3, 5),)).module()
    bmm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.bmm.default)
    with pytest.raises(MatchFailure, match="cannot find the heads"):
        heads_of_flat_batch(bmm.args[0])


def _einsum(score_eq, value_eq, layout="bhsd"):
    def core(q, k, v):
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        p = torch.einsum(score_eq, q, k).mul(SCALE).softmax(-1)
        out = torch.einsum(value_eq, p, v)
        return out.transpose(1, 2) if layout == "bshd" else out
    return core


EINSUMS = {
    "bhqd,bhkd->bhqk": _einsum("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
    "bqhd,bkhd->bhqk": _einsum("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", layout="bshd"),
    "...qd,...kd->...qk": _einsum("...qd,...kd->...qk", "...qk,...kd->...qd"),
    "spaces": _einsum("b h i d, b h j d -> b h i j", "b h i j, b h j d -> b h i d"),
    "bhqd,bhdk->bhqk": lambda q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhdk->bhqk", q, k.transpose(-1, -2))
        .mul(SCALE).softmax(-1), v),
}


@pytest.mark.parametrize("eq", EINSUMS)
def test_einsum_positive_and_numeric(eq):
    model = Attn(EINSUMS[eq])
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.pattern == "einsum-softmax"
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, H, D)
    assert site.scale == pytest.approx(SCALE)
    assert site.q_proj.weight == "q_proj.weight" and site.k_proj.weight == "k_proj.weight"
    assert_numeric(prog, model)


def test_negative_einsum_outer_product():
    """softmax over an outer product (no contracted label) is not q @ k^T."""

    def core(q, k, v):
        a, b = q.sum(-1), k.sum(-1)  # [B, H, S]
        p = torch.einsum("bhq,bhk->bhqk", a, b).softmax(-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "is not q @ k^T" in reason


def test_negative_einsum_not_scores_shape():
    """softmax over the channels of an elementwise q*k product (rank-5 'scores')."""

    def core(q, k, v):
        p = torch.einsum("bhqd,bhkd->bhqkd", q, k).softmax(-1)
        return torch.einsum("bhqkd,bhkd->bhqd", p, v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "does not produce [batch..., q, k] scores" in reason


def test_negative_scores_by_einsum_values_by_matmul_still_exact():
    """Mixed forms are either recognized exactly or rejected with a reason; never wrong."""

    def core(q, k, v):
        p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1)
        return p @ v

    model = Attn(core)
    prog = capture(model, hidden(*SHAPES[0]), require_attention=False)
    if prog.sites:
        assert_numeric(prog, model)
    else:
        assert "einsum but values by matmul" in prog.rejected[0].reason
