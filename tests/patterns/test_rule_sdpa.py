"""SDPA_CALL: ``F.scaled_dot_product_attention`` on [B, H, S, D] becomes one canonical node."""

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
    merge_heads,
    only_site,
    rejection_reasons,
    to_heads,
)
from torch import nn

from rewriter.patterns.core import DEFAULT_RULES, SDPA_CALL, find


def sdpa(**kw):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)


def test_positive_plain_sdpa():
    model = Attn(sdpa())
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.pattern == "sdpa"
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.v_head_dim) == (H, H, D, D)
    assert site.scale == pytest.approx(D**-0.5)
    assert (site.is_causal, site.mask, site.softcap, site.dropout) == (False, "none", 0.0, 0.0)
    assert site.kv_expansion == "none" and site.positional == "none" and not site.cross
    assert site.q_proj.weight == "q_proj.weight" and site.q_proj.bias == "q_proj.bias"
    assert site.o_proj is not None and site.o_proj.weight == "o_proj.weight"
    assert prog.rejected == []


def test_positive_explicit_scale_and_causal():
    site = only_site(capture(Attn(sdpa(scale=0.3, is_causal=True)), hidden(*SHAPES[0])))
    assert site.scale == pytest.approx(0.3)
    assert site.is_causal and site.mask == "causal"


def test_rule_is_composable_data():
    assert [r.name for r in DEFAULT_RULES.rules] == ["sdpa", "softmax-core"]
    assert [r.name for r in (SDPA_CALL + SDPA_CALL).rules] == ["sdpa", "sdpa"]
    gm = torch.export.export(Attn(sdpa()), (hidden(2, 5),)).module()
    matches, rejected = find(gm, SDPA_CALL + SDPA_CALL)
    assert len(matches) == 1 and rejected == []  # first matching rule wins, no duplicates


class Sdpa3D(nn.Module):
    """SDPA over a [B, S, E] tensor: one 'head' per batch row, no head dim."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


def test_negative_non_4d_sdpa():
    (reason,) = rejection_reasons(Sdpa3D().eval(), hidden(*SHAPES[0]))
    assert "non-4-D" in reason


class MaskedSdpa(Attn):
    """SDPA with a float (ALiBi-like) bias built from the length, or a bool padding mask."""

    def __init__(self, kind: str):
        super().__init__(core=None)
        self.kind = kind
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(1, H, 1, 1))

    def forward(self, x, keep):
        s = x.shape[1]
        if self.kind == "float":
            pos = torch.arange(s, dtype=x.dtype)
            mask = -(pos[:, None] - pos[None, :]).abs() * self.slopes
        else:
            mask = keep[:, None, None, :].bool()
        q, k, v = (to_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(merge_heads(out))


def _masked_inputs(b, s):
    keep = torch.ones(b, s, dtype=torch.long)
    keep[0, -2:] = 0  # padding in the first sequence
    return (hidden(b, s), keep), {}


@pytest.mark.parametrize("kind,mask", [("float", "bias"), ("bool", "padding")])
def test_positive_mask_passed_through(kind, mask):
    model = MaskedSdpa(kind).eval()
    prog = capture(model, *_masked_inputs(*SHAPES[0])[0])
    assert only_site(prog).mask == mask
    assert_numeric(prog, model, _masked_inputs)


@pytest.mark.parametrize("core,kv_heads", [
    (sdpa(), None),
    (sdpa(is_causal=True), None),
    (sdpa(scale=0.7), None),
    (sdpa(enable_gqa=True), HKV),
    (sdpa(enable_gqa=True, is_causal=True), HKV),
], ids=["plain", "causal", "scale", "enable_gqa", "enable_gqa-causal"])
def test_numeric(core, kv_heads):
    model = Attn(core, kv_heads=kv_heads)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.num_kv_heads == (kv_heads or H)
    assert_numeric(prog, model)
