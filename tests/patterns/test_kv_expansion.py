"""KV expansion: K/V heads repeated for GQA (repeat_kv expand+reshape, repeat_interleave,
SDPA enable_gqa) are peeled, so the canonical node gets [B, Hkv, S, D] keys and values. Tiling
(``k.repeat``: head h reads h % Hkv) is a different grouping and must not be peeled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import (
    HKV,
    SHAPES,
    Attn,
    D,
    H,
    assert_numeric,
    capture,
    hidden,
    only_site,
)

GROUP = H // HKV


def repeat_kv(x, n):
    b, hkv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n, s, d).reshape(b, hkv * n, s, d)


def eager(q, k, v):
    return (q @ k.transpose(-1, -2) * D**-0.5).softmax(-1) @ v


EXPANSIONS = {
    "repeat_kv": (lambda q, k, v: eager(q, repeat_kv(k, GROUP), repeat_kv(v, GROUP)),
                  "repeat_kv"),
    "repeat_kv-sdpa": (lambda q, k, v: F.scaled_dot_product_attention(
        q, repeat_kv(k, GROUP), repeat_kv(v, GROUP), is_causal=True), "repeat_kv"),
    "repeat_interleave": (lambda q, k, v: eager(
        q, k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)),
        "repeat_interleave"),
    "unsqueeze-expand-flatten": (lambda q, k, v: eager(
        q, k.unsqueeze(2).expand(-1, -1, GROUP, -1, -1).flatten(1, 2),
        v.unsqueeze(2).expand(-1, -1, GROUP, -1, -1).flatten(1, 2)), "repeat_kv"),
    "enable_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                   "enable_gqa"),
}


@pytest.mark.parametrize("name", EXPANSIONS)
def test_positive_and_numeric(name):
    core, kind = EXPANSIONS[name]
    model = Attn(core, kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == kind
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, HKV, D)
    assert site.num_kv_heads < site.num_heads and site.kv_group == GROUP
    # The K/V projections are traced through to their own KV heads.
    assert site.k_proj.weight == "k_proj.weight" and len(site.k_proj.features) == HKV
    assert site.v_proj.features == tuple(tuple(range(h * D, (h + 1) * D)) for h in range(HKV))
    # The canonical node receives the unexpanded K and V.
    node = next(n for n in prog.module.graph.nodes if n.name == site.node)
    assert node.args[1].meta["val"].shape[1] == HKV
    assert node.args[2].meta["val"].shape[1] == HKV
    assert_numeric(prog, model)


def tile(q, k, v):
    """k.repeat(1, g, 1, 1): head h reads KV head h % Hkv, not h // group."""
    return eager(q, k.repeat(1, GROUP, 1, 1), v.repeat(1, GROUP, 1, 1))


def test_negative_tiling_is_not_peeled():
    model = Attn(tile, kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "none"
    assert site.num_kv_heads == site.num_heads == H
    assert_numeric(prog, model)


def test_negative_k_and_v_expanded_differently_not_peeled():
    """K grouped (h // g) but V tiled (h % Hkv): no single GQA grouping; keep both expanded."""

    def core(q, k, v):
        return eager(q, repeat_kv(k, GROUP), v.repeat(1, GROUP, 1, 1))

    model = Attn(core, kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "none" and site.num_kv_heads == H
    assert_numeric(prog, model)


def test_negative_expanded_over_sequence_not_heads():
    """expand on a non-head dim (a single shared key broadcast over the sequence) is no GQA."""

    def core(q, k, v):
        s = k.shape[2]
        k0 = k[:, :, :1].expand(-1, -1, s, -1)
        return eager(q, k0, v)

    model = Attn(core)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "none" and site.num_kv_heads == H
    assert_numeric(prog, model)


def test_mqa_single_kv_head():
    model = Attn(lambda q, k, v: eager(q, repeat_kv(k, H), repeat_kv(v, H)), kv_heads=1)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert (site.num_kv_heads, site.kv_expansion) == (1, "repeat_kv")
    assert_numeric(prog, model)


def test_gqa_numerics_use_grouped_kv_heads():
    """The canonical op groups query heads h -> h // group (SDPA enable_gqa semantics)."""
    q = torch.randn(2, H, 5, D)
    k, v = torch.randn(2, HKV, 5, D), torch.randn(2, HKV, 5, D)
    want = eager(q, repeat_kv(k, GROUP), repeat_kv(v, GROUP))
    got = torch.ops.rewriter.attention(q, k, v, None, scale=D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
