"""Q/K/V projections traced back from the canonical operands (separate linears, fused QKV split
/ chunk / unbind, per-head interleaved, GPT-2 Conv1D addmm) and the output projection."""

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

SCALE = D**-0.5


def heads_block(start: int, heads: int = H, dim: int = D):
    """Per-head features of a contiguous block starting at ``start``."""
    return tuple(tuple(range(start + h * dim, start + (h + 1) * dim)) for h in range(heads))


def core(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class Fused(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.eval()

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x)
        if self.how == "split":
            q, k, v = (to_heads(t, H) for t in qkv.split(E, dim=-1))
        elif self.how == "chunk":
            q, k, v = (to_heads(t, H) for t in qkv.chunk(3, dim=-1))
        elif self.how == "slice":
            q, k, v = (to_heads(qkv[..., i * E:(i + 1) * E], H) for i in range(3))
        elif self.how == "unbind":  # timm: [B, S, 3, H, D] -> [3, B, H, S, D]
            q, k, v = qkv.view(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.how == "interleaved":  # GPT-NeoX: [B, S, H, 3D] per head q|k|v
            q, k, v = qkv.view(b, s, H, 3 * D).transpose(1, 2).chunk(3, dim=-1)
        else:
            raise ValueError(self.how)
        return self.out(merge_heads(core(q, k, v)))


@pytest.mark.parametrize("how", ["split", "chunk", "slice", "unbind"])
def test_fused_qkv_contiguous(how):
    model = Fused(how)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    projs = (site.q_proj, site.k_proj, site.v_proj)
    assert all(p is not None for p in projs), site.notes
    assert {p.weight for p in projs} == {"qkv.weight"}
    assert {p.bias for p in projs} == {"qkv.bias"}
    assert all(p.kind == "linear" for p in projs)
    assert [p.features for p in projs] == [heads_block(0), heads_block(E), heads_block(2 * E)]
    assert site.o_proj.weight == "out.weight" and site.o_proj.features == heads_block(0)
    assert_numeric(prog, model)


def test_fused_flag_on_every_slice():
    site = only_site(capture(Fused("split"), hidden(*SHAPES[0])))
    assert [p.fused for p in (site.q_proj, site.k_proj, site.v_proj)] == [True, True, True]


def test_fused_qkv_interleaved():
    model = Fused("interleaved")
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    q, k, v = site.q_proj, site.k_proj, site.v_proj
    assert {q.weight, k.weight, v.weight} == {"qkv.weight"}
    for h in range(H):
        base = 3 * D * h
        assert q.features[h] == tuple(range(base, base + D))
        assert k.features[h] == tuple(range(base + D, base + 2 * D))
        assert v.features[h] == tuple(range(base + 2 * D, base + 3 * D))
    assert "interleaved" in q.describe()
    assert_numeric(prog, model)


class Separate(nn.Module):
    def __init__(self, bias=True, qk_bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(E, E, bias=qk_bias)
        self.k = nn.Linear(E, E, bias=qk_bias)
        self.v = nn.Linear(E, E, bias=bias)
        self.o = nn.Linear(E, E, bias=bias)
        self.eval()

    def forward(self, x):
        q, k, v = (to_heads(p(x), H) for p in (self.q, self.k, self.v))
        return self.o(merge_heads(core(q, k, v)))


@pytest.mark.parametrize("qk_bias", [True, False])
def test_separate_linears(qk_bias):
    model = Separate(qk_bias=qk_bias)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    for name, proj in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj)):
        assert proj.weight == f"{name}.weight" and proj.kind == "linear"
        assert proj.features == heads_block(0)
        assert not proj.fused
    assert site.q_proj.bias == ("q.bias" if qk_bias else None)
    assert site.v_proj.bias == "v.bias"
    assert site.o_proj.weight == "o.weight" and site.o_proj.node
    assert site.notes == []
    assert_numeric(prog, model)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = addmm(b, x.view(-1, nx), W) with W [nx, nf]."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class Gpt2Style(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c_attn = Conv1D(E, 3 * E)
        self.c_proj = Conv1D(E, E)
        self.eval()

    def forward(self, x):
        q, k, v = (to_heads(t, H) for t in self.c_attn(x).split(E, dim=2))
        return self.c_proj(merge_heads(core(q, k, v)))


def test_conv1d_addmm():
    model = Gpt2Style()
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    projs = (site.q_proj, site.k_proj, site.v_proj)
    assert {p.weight for p in projs} == {"c_attn.weight"}
    assert {p.kind for p in projs} == {"conv1d"}
    assert [p.features for p in projs] == [heads_block(0), heads_block(E), heads_block(2 * E)]
    assert site.o_proj.weight == "c_proj.weight" and site.o_proj.kind == "conv1d"
    assert_numeric(prog, model)


class NoQProjection(nn.Module):
    """q is not a projection of the input: a rescaled input, or a nonlinearity after a linear."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.q = nn.Linear(E, E)
        self.k = nn.Linear(E, E)
        self.v = nn.Linear(E, E)
        self.eval()

    def forward(self, x):
        q = x * 2 if self.how == "scaled-input" else torch.relu(self.q(x))
        q, k, v = to_heads(q, H), to_heads(self.k(x), H), to_heads(self.v(x), H)
        return merge_heads(core(q, k, v))


@pytest.mark.parametrize("how,blamed", [("scaled-input", "x"), ("relu", "relu")])
def test_negative_q_without_projection(how, blamed):
    model = NoQProjection(how)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.q_proj is None
    assert site.k_proj.weight == "k.weight" and site.v_proj.weight == "v.weight"
    (note,) = site.notes
    assert note.startswith("q: ") and "neither a layout op nor a projection" in note
    assert blamed in note
    assert site.o_proj is None  # the merged heads are returned, not projected
    assert_numeric(prog, model)


def test_negative_features_mixing_heads():
    """A projection whose per-head features change with the token (a roll over the sequence
    that mixes features) does not map heads to fixed features: q_proj None with a note."""

    class Rolled(Separate):
        def forward(self, x):
            b, s, _ = x.shape
            qf = self.q(x).reshape(b, s * H, D).roll(1, dims=1).reshape(b, s, E)
            q, k, v = to_heads(qf, H), to_heads(self.k(x), H), to_heads(self.v(x), H)
            return self.o(merge_heads(core(q, k, v)))

    model = Rolled()
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.q_proj is None and site.notes and site.notes[0].startswith("q: ")
    assert site.k_proj is not None
    assert_numeric(prog, model)
