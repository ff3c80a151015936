"""KV heads copied before RoPE (Falcon-40B's new decoder architecture): K/V are broadcast from
Hkv to H heads and *then* rotated, so no layout chain from the core's K reaches [B, Hkv, S, D].
The heads of a group still hold equal values (RoPE's cos/sin do not vary over heads), so the
canonical node takes one head per group (rewriter.patterns.head_copies). Copies that RoPE makes
different (per-head angles), and tiled copies (head h reads h % Hkv), are not peeled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import HKV, SHAPES, Attn, D, H, assert_numeric, capture, hidden, only_site

GROUP = H // HKV


def rotate_half(x):
    return torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1)


def cos_sin(seq: int, heads: int = 1):
    """[1, heads, S, D] angles; with heads > 1 every head gets its own frequencies."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    inv = inv[None, :] * (1.0 + torch.arange(heads, dtype=torch.float32)[:, None])  # [h, D/2]
    freqs = torch.arange(seq, dtype=torch.float32)[None, :, None] * inv[:, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos(), emb.sin()


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def broadcast_heads(x):
    """[B, Hkv, S, D] -> [B, H, S, D], head h a copy of KV head h // GROUP (Falcon's
    broadcast_to of [B, S, Hkv, 1, D] to the query groups, here in [B, H, S, D] order)."""
    b, hkv, s, d = x.shape
    return x[:, :, None].broadcast_to(b, hkv, GROUP, s, d).flatten(1, 2)


def tile_heads(x):
    return x.repeat(1, GROUP, 1, 1)  # head h reads KV head h % Hkv


def make_core(copy=broadcast_heads, per_head_angles=False, sdpa=True):
    def core(q, k, v):
        s = q.shape[-2]
        cos, sin = cos_sin(s, H if per_head_angles else 1)
        k, v = copy(k), copy(v)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (q @ k.transpose(-1, -2) * D**-0.5).softmax(-1) @ v
    return core


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "eager"])
def test_copies_before_rope_positive_and_numeric(sdpa):
    model = Attn(make_core(sdpa=sdpa), kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "head-copies"
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, HKV, D)
    assert site.positional == "rope"
    # K/V projections are traced through RoPE and the broadcast to their own KV heads.
    for name, proj in (("k", site.k_proj), ("v", site.v_proj)):
        assert proj is not None and proj.weight == f"{name}_proj.weight", site.notes
        assert proj.features == tuple(tuple(range(h * D, (h + 1) * D)) for h in range(HKV))
    assert_numeric(prog, model)


def test_negative_per_head_angles_not_peeled():
    """RoPE with different angles per head makes the copies differ: keep all H KV heads."""
    model = Attn(make_core(per_head_angles=True), kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "none"
    assert site.num_kv_heads == H
    assert_numeric(prog, model)


def test_negative_tiled_copies_not_peeled():
    """Tiled copies (h reads h % Hkv) are not the GQA grouping (h reads h // group)."""
    model = Attn(make_core(copy=tile_heads), kv_heads=HKV)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.kv_expansion == "none"
    assert site.num_kv_heads == H
    assert_numeric(prog, model)
