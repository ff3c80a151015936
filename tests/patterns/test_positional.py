"""Positional transforms between the projections and the core: RoPE with half rotation
(rotate_half), interleaved rotation (rotate-every-two via stack/flatten), partial RoPE; a
multiplication of q by something that is not a rotation is not RoPE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import (
    SHAPES,
    D,
    E,
    H,
    assert_numeric,
    capture,
    hidden,
    merge_heads,
    only_site,
    to_heads,
)
from torch import nn

HEAD = 8  # rotary needs an even head dim; 8 allows a partial rotary of 4
HEADS = E // HEAD


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def cos_sin(seq, dim, interleaved, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [S, dim/2]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]


class Rotary(nn.Module):
    def __init__(self, kind: str, rotary_dim: int = HEAD):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.rotary_dim = kind, rotary_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(E, E) for _ in range(4))
        self.gain = nn.Parameter(torch.rand(HEAD) + 0.5)
        self.eval()

    def rope(self, x, cos, sin):
        if self.kind == "not-rotation":  # x * cos + x * sin: nothing is rotated
            return x * cos + x * sin
        if self.kind == "gain":  # a learned per-channel gain (QK-norm weight style)
            return x * self.gain
        rotate = rotate_every_two if self.kind == "interleaved" else rotate_half
        r = self.rotary_dim
        if r == HEAD:
            return x * cos + rotate(x) * sin
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)

    def forward(self, x):
        s = x.shape[1]
        cos, sin = cos_sin(s, self.rotary_dim, self.kind == "interleaved", x.dtype)
        q = self.rope(to_heads(self.q_proj(x), HEADS), cos, sin)
        k = self.rope(to_heads(self.k_proj(x), HEADS), cos, sin)
        v = to_heads(self.v_proj(x), HEADS)
        return self.o_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


@pytest.mark.parametrize("kind,rotary_dim,positional", [
    ("half", HEAD, "rope"),
    ("interleaved", HEAD, "rope"),
    ("half", HEAD // 2, "rope-partial"),
    ("interleaved", HEAD // 2, "rope-partial"),
], ids=["half", "interleaved", "partial-half", "partial-interleaved"])
def test_rope_positive_and_numeric(kind, rotary_dim, positional):
    model = Rotary(kind, rotary_dim)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.positional == positional
    assert (site.num_heads, site.head_dim) == (HEADS, HEAD)
    # Projections are traced through the rotation (it keeps elements in their head).
    for name, proj in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj)):
        assert proj is not None and proj.weight == f"{name}_proj.weight", site.notes
        assert proj.features == tuple(tuple(range(h * HEAD, (h + 1) * HEAD))
                                      for h in range(HEADS))
    assert site.notes == []
    assert_numeric(prog, model)


class HFRotary(nn.Module):
    """Llama style: cos/sin [B, S, D] from position_ids, unsqueezed at dim 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(E, E) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, D, 2) / D)))
        self.eval()

    def forward(self, x):
        b, s, _ = x.shape
        pos = torch.arange(s)[None].expand(b, -1).float()
        freqs = (self.inv_freq[None, :, None] @ pos[:, None, :]).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
        q, k, v = (to_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        p = (q @ k.transpose(-1, -2) * D**-0.5).softmax(-1)
        return self.o_proj(merge_heads(p @ v))


def test_rope_llama_style_eager():
    model = HFRotary()
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.positional == "rope" and site.pattern == "matmul-softmax"
    assert site.q_proj.weight == "q_proj.weight" and site.k_proj.weight == "k_proj.weight"
    assert_numeric(prog, model)


@pytest.mark.parametrize("kind", ["not-rotation", "gain"])
def test_negative_not_rope(kind):
    """q and k multiplied by cos/sin-like tensors without a rotation, or by a learned gain:
    the core is still attention, but positional is not "rope"; q/k either have no projection
    (with a note saying why) or the right one."""
    model = Rotary(kind)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert "rope" not in site.positional
    for side in ("q", "k"):
        proj = getattr(site, f"{side}_proj")
        if proj is None:
            assert any(n.startswith(f"{side}: ") for n in site.notes), site.notes
        else:
            assert proj.weight == f"{side}_proj.weight"
    assert site.v_proj is not None and site.v_proj.weight == "v_proj.weight"
    assert_numeric(prog, model)


def test_rope_on_q_only_is_reported_per_side():
    """RoPE on q but not on k: positional says so per side instead of claiming rope."""

    class QOnly(Rotary):
        def forward(self, x):
            s = x.shape[1]
            cos, sin = cos_sin(s, HEAD, False, x.dtype)
            q = self.rope(to_heads(self.q_proj(x), HEADS), cos, sin)
            k, v = to_heads(self.k_proj(x), HEADS), to_heads(self.v_proj(x), HEADS)
            return self.o_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))

    model = QOnly("half")
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.positional != "rope"
    assert "q:rope" in site.positional and "k:none" in site.positional
    assert_numeric(prog, model)


class FullSliceRotary(Rotary):
    """GPT-J / CodeGen partial RoPE: ``x[:, :, :, :r]`` and ``x[:, :, :, r:]`` are written with
    explicit full slices, which export as separate no-op ``slice`` nodes on each side, so the
    rotated part and the passed-through part are not sliced from the same node. ``passed_from``
    "other": the pass-through half is sliced from a different tensor (not partial RoPE of x)."""

    def __init__(self, kind: str, passed_from: str = "same"):
        super().__init__(kind, HEAD // 2)
        self.passed_from = passed_from

    def rope(self, x, cos, sin):
        r = self.rotary_dim
        rotate = rotate_every_two if self.kind == "interleaved" else rotate_half
        x_rot = x[:, :, :, :r]
        other = x if self.passed_from == "same" else x * 2.0 + 1.0
        x_pass = other[:, :, :, r:]
        return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


@pytest.mark.parametrize("kind", ["half", "interleaved"])
def test_partial_rope_through_full_slices(kind):
    model = FullSliceRotary(kind)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.positional == "rope-partial"
    for name, proj in (("q", site.q_proj), ("k", site.k_proj)):
        assert proj is not None and proj.weight == f"{name}_proj.weight", site.notes
        assert proj.features == tuple(tuple(range(h * HEAD, (h + 1) * HEAD))
                                      for h in range(HEADS))
    assert site.notes == []
    assert_numeric(prog, model)


def test_partial_rope_negative_pass_through_from_another_tensor():
    """cat(rope(x[..., :r]), y[..., r:]) with y computed from x is not a positional transform
    of x: no rope-partial, and q/k get no projection (with a note) rather than a wrong one."""
    model = FullSliceRotary("half", passed_from="other")
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert "rope" not in site.positional
    for side in ("q", "k"):
        assert getattr(site, f"{side}_proj") is None
        assert any(n.startswith(f"{side}: ") for n in site.notes), site.notes
    assert_numeric(prog, model)
