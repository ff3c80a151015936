"""ALiBi (rewriter.patterns.alibi): an additive ``slopes[h] * key_position`` bias becomes the
canonical op's ``alibi`` attribute, proven from the bias subgraph's structure and its value on
the captured example; anything else stays an opaque additive mask, with the reason noted."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import (
    SHAPES,
    Attn,
    D,
    H,
    assert_numeric,
    canonical_nodes,
    capture,
    hidden,
    only_site,
)

from rewriter.ir.ops import alibi_bias, attention, reference_attention
from rewriter.patterns.alibi import NotAlibi, slopes_of

SLOPES = [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]


def _slopes(device=None) -> torch.Tensor:
    return torch.tensor(SLOPES, device=device)


def _causal(s, device=None):
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


def baddbmm_core(q, k, v):
    """BLOOM's form on [B*H, S, D]: baddbmm(alibi [B*H, 1, S], q, k^T, beta=1, alpha=1/sqrt(D))."""
    b, h, s, d = q.shape
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    alibi = (_slopes(q.device)[:, None, None] * pos).repeat(b, 1, 1)
    scores = torch.baddbmm(alibi, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2),
                           beta=1.0, alpha=1 / math.sqrt(d))
    scores = scores.view(b, h, s, s).masked_fill(~_causal(s, q.device), float("-inf"))
    probs = scores.softmax(-1).view(b * h, s, s)
    return torch.bmm(probs, v.reshape(b * h, s, d)).view(b, h, s, d)


def add_core(q, k, v):
    """``scores + slopes[h] * j`` on [B, H, S, S], the bias [H, 1, S]."""
    s = q.shape[2]
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + _slopes(q.device)[:, None, None] * pos
    return scores.masked_fill(~_causal(s, q.device), float("-inf")).softmax(-1) @ v


def relative_core(q, k, v):
    """MPT/paper form ``-slope * (i - j)`` [H, S, S]: a per-row constant away from slope * j."""
    s = q.shape[2]
    pos = torch.arange(s, device=q.device)
    rel = (pos[None, :] - pos[:, None]).float()  # j - i
    scores = q @ k.transpose(-1, -2) * D**-0.5 + _slopes(q.device)[:, None, None] * rel
    return scores.masked_fill(~_causal(s, q.device), float("-inf")).softmax(-1) @ v


def sdpa_mask_core(q, k, v):
    """ALiBi folded into SDPA's float mask with the causal part (Falcon's way)."""
    s = q.shape[2]
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    bias = (_slopes(q.device)[:, None, None] * pos).expand(H, s, s)
    mask = bias.masked_fill(~_causal(s, q.device), torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("core, pattern", [
    (baddbmm_core, "baddbmm-softmax"), (add_core, "matmul-softmax"),
    (relative_core, "matmul-softmax"), (sdpa_mask_core, "sdpa"),
], ids=["baddbmm", "add", "relative", "sdpa-mask"])
def test_positive_alibi_forms(core, pattern):
    model = Attn(core)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.pattern == pattern
    assert site.positional == "alibi"
    assert site.alibi == pytest.approx(SLOPES, rel=1e-6)
    (node,) = canonical_nodes(prog)
    assert node.kwargs["alibi"] == pytest.approx(SLOPES, rel=1e-6)
    assert site.mask in ("causal-mask", "bias")  # what remains of the mask: causal only
    assert_numeric(prog, model)


def test_positive_alibi_mask_keeps_no_bias_tensor():
    """After the proof, the canonical node's mask is the causal part alone: no [H, 1, S] bias
    tensor reaches it (the bias subgraph is dead code)."""
    prog = capture(Attn(add_core), hidden(*SHAPES[0]))
    (node,) = canonical_nodes(prog)
    mask = node.args[3]
    assert mask is not None and mask.meta["val"].dim() == 2  # [S, S], no head axis: causal only


# --- negative: stays an opaque bias, with the reason -------------------------------------------


def quadratic_core(q, k, v):
    s = q.shape[2]
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    scores = q @ k.transpose(-1, -2) * D**-0.5 + _slopes(q.device)[:, None, None] * pos**2
    return scores.softmax(-1) @ v


def activation_core(q, k, v):
    """A per-key bias computed from the keys themselves: content, not position."""
    scores = q @ k.transpose(-1, -2) * D**-0.5 + k.sum(-1)[:, :, None, :]
    return scores.softmax(-1) @ v


def per_query_core(q, k, v):
    """Slope depends on the query row: not one slope per head."""
    s = q.shape[2]
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    scores = q @ k.transpose(-1, -2) * D**-0.5 + pos[:, None] * pos[None, :] * 0.1
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("core, reason", [
    (quadratic_core, "not linear in the key position"),
    (activation_core, "activations|reads the values"),
    (per_query_core, "differs between batch rows or queries"),
], ids=["quadratic", "activation", "per-query"])
def test_negative_not_alibi(core, reason):
    model = Attn(core)
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.alibi == () and site.positional == "none"
    (node,) = canonical_nodes(prog)
    assert "alibi" not in node.kwargs and node.args[3] is not None  # an opaque bias
    notes = " ".join(site.notes)
    assert "not ALiBi" in notes
    assert re.search(reason, notes), notes
    assert_numeric(prog, model)


def test_negative_bias_from_extra_input():
    """A bias computed from a float input's values (not positions) is not ALiBi."""

    class WithBias(Attn):
        def forward(self, x, scale_in):
            self.scale_in = scale_in
            return super().forward(x)

    def core(q, k, v):
        s = q.shape[2]
        pos = torch.arange(s, device=q.device, dtype=torch.float32)
        scores = q @ k.transpose(-1, -2) * D**-0.5 + model.scale_in[:, None, None, None] * pos
        return scores.softmax(-1) @ v

    model = WithBias(core)
    x = hidden(*SHAPES[0])
    prog = capture(model, x, torch.full((x.shape[0],), 0.5))
    site = only_site(prog)
    assert site.alibi == ()
    assert any("reads the values of input" in n for n in site.notes), site.notes


def test_negative_example_too_short():
    """Two keys always lie on a line: a capture with Sk < 3 proves nothing."""
    prog = capture(Attn(add_core), hidden(1, 2), dynamic=False)
    site = only_site(prog)
    assert site.alibi == ()
    assert any("at least 3" in n for n in site.notes), site.notes


def test_t5_relative_bias_is_not_alibi(zoo_captured):
    """T5's bucketed relative bias is a position bias, but not a linear one: it stays the
    mask, and the note says why."""
    prog = zoo_captured("t5-sdpa").prog
    assert all(s.alibi == () for s in prog.sites)
    assert any("not linear" in n for s in prog.sites for n in s.notes)


@pytest.mark.parametrize("name", ["llama-eager", "gpt2-eager", "bert-eager"])
def test_plain_masks_get_no_alibi_note(zoo_captured, name):
    """Padding and causal masks are masks, not position biases: no ALiBi note on them."""
    prog = zoo_captured(name).prog
    assert all(s.alibi == () for s in prog.sites)
    assert not [n for s in prog.sites for n in s.notes if "ALiBi" in n]


# --- numeric: the reading and the op ---------------------------------------------------------


def test_slopes_of_reads_each_layout():
    b, s = 2, 6
    pos = torch.arange(s, dtype=torch.float32)
    per_head = _slopes()[:, None, None] * pos  # [H, 1, S]
    assert slopes_of(per_head, H, 4) == pytest.approx(SLOPES)
    flat = per_head.repeat(b, 1, 1)  # [B*H, 1, S] at score rank 3
    assert slopes_of(flat, H, 3) == pytest.approx(SLOPES)
    shifted = per_head - 5.0 * torch.arange(s)[:, None]  # a per-row constant
    assert slopes_of(shifted, H, 4) == pytest.approx(SLOPES)
    assert slopes_of(0.5 * pos, H, 4) == pytest.approx([0.5] * H)  # one slope for all heads
    with pytest.raises(NotAlibi, match="masks"):
        slopes_of(per_head.masked_fill(pos > 3, float("-inf")), H, 4)
    with pytest.raises(NotAlibi, match="heads"):
        slopes_of(torch.zeros(3, 1, s) + pos, H, 4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [H, 2])
def test_op_alibi_equals_explicit_bias(causal, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, H, 5, D, generator=g)
    k, v = (torch.randn(2, hkv, 7, D, generator=g) for _ in range(2))
    pad = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    pad[0, ..., :2] = False
    bias = alibi_bias(SLOPES, 7)
    for mask in (None, pad, torch.randn(2, 1, 5, 7, generator=g)):
        want_mask = bias if mask is None else (
            bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask + bias)
        want = reference_attention(q, k, v, want_mask, scale=0.3, is_causal=causal)
        got = attention(q, k, v, mask, scale=0.3, is_causal=causal, alibi=SLOPES)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        ref = reference_attention(q, k, v, mask, scale=0.3, is_causal=causal, alibi=SLOPES)
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)


def test_op_alibi_with_sparsity_and_softcap():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, 9, D, generator=g) for _ in range(3))
    for kw in ({"sparsity": "window=3,sink=1", "is_causal": True}, {"softcap": 5.0}):
        got = attention(q, k, v, scale=0.5, alibi=SLOPES, **kw)
        want = reference_attention(q, k, v, alibi_bias(SLOPES, 9), scale=0.5, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_op_alibi_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, scale=0.5, is_causal=True, alibi=SLOPES), (q, k, v))


def test_cached_op_alibi_equals_full_rows():
    """cached_attention with ALiBi: the new queries' rows of full causal attention over
    cat(past, new) (kv_idx is the cache position, so no offset is needed)."""
    g = torch.Generator().manual_seed(3)
    past, new = 6, 3
    q = torch.randn(2, H, past + new, D, generator=g)
    k, v = (torch.randn(2, 2, past + new, D, generator=g) for _ in range(2))
    full = attention(q, k, v, scale=0.4, is_causal=True, alibi=SLOPES)
    out, pk, pv = torch.ops.rewriter.cached_attention(
        q[:, :, past:], k[:, :, past:], v[:, :, past:], k[:, :, :past], v[:, :, :past],
        scale=0.4, alibi=SLOPES)
    torch.testing.assert_close(out, full[:, :, past:], rtol=1e-5, atol=1e-6)
    assert pk.shape[2] == past + new
