"""The score chain between ``q @ k^T`` and the softmax: scale (before or after the product,
multiplied or divided), masks (masked_fill, where, additive), tanh softcap, baddbmm."""

from __future__ import annotations

import math

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
    causal_keep,
    hidden,
    only_site,
    rejection_reasons,
)

SCALE = D**-0.5


def qk(q, k):
    return q @ k.transpose(-1, -2)


def attend(scores, v):
    return scores.softmax(-1) @ v


# --- scale ------------------------------------------------------------------------------------

SCALE_CORES = {
    "mul-after": lambda q, k, v: attend(qk(q, k) * SCALE, v),
    "mul-after-left": lambda q, k, v: attend(SCALE * qk(q, k), v),
    "div-after": lambda q, k, v: attend(qk(q, k) / math.sqrt(D), v),
    # Falcon: `scores /= math.sqrt(D)` exports as the in-place aten.div_.Tensor.
    "div-inplace": lambda q, k, v: attend(qk(q, k).div_(math.sqrt(D)), v),
    "q-prescaled": lambda q, k, v: attend(qk(q * SCALE, k), v),
    "q-prescaled-div": lambda q, k, v: attend(qk(q / math.sqrt(D), k), v),
    "k-prescaled": lambda q, k, v: attend(qk(q, k * SCALE), v),
    "both-prescaled": lambda q, k, v: attend(qk(q * D**-0.25, k * D**-0.25), v),
    "twice": lambda q, k, v: attend(qk(q, k) * 2.0 / (2.0 * math.sqrt(D)), v),
    "unscaled": lambda q, k, v: attend(qk(q, k), v),
}


@pytest.mark.parametrize("name", SCALE_CORES)
def test_scale_positive_and_numeric(name):
    model = Attn(SCALE_CORES[name])
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    want = 1.0 if name == "unscaled" else SCALE
    assert site.scale == pytest.approx(want, rel=1e-6)
    assert site.mask == "none" and site.softcap == 0.0
    assert_numeric(prog, model)


def test_negative_scores_times_tensor():
    def core(q, k, v):
        gate = torch.sigmoid(q.mean(-1, keepdim=True))  # data-dependent, not a scale
        return attend(qk(q, k) * gate, v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "multiplies the scores by a tensor" in reason


def test_negative_scores_divided_in_place_by_tensor():
    def core(q, k, v):
        gate = torch.sigmoid(q.mean(-1, keepdim=True)) + 1.0  # data-dependent, not a scale
        return attend(qk(q, k).div_(gate), v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "by a tensor" in reason


# --- masks ------------------------------------------------------------------------------------


def _fill(value):
    def core(q, k, v):
        s = q.shape[-2]
        scores = qk(q, k) * SCALE
        return attend(scores.masked_fill(~causal_keep(s, q.device), value), v)
    return core


def _where(flavour):
    def core(q, k, v):
        s = q.shape[-2]
        keep = causal_keep(s, q.device)
        scores = qk(q, k) * SCALE
        if flavour == "keep-scores":
            scores = torch.where(keep, scores, float("-inf"))
        elif flavour == "fill-first":
            scores = torch.where(~keep, torch.finfo(scores.dtype).min, scores)
        else:  # a full() tensor as the fill
            scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
        return attend(scores, v)
    return core


def _additive(kind):
    def core(q, k, v):
        s = q.shape[-2]
        if kind == "triu-inf":
            mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        else:  # HF style: 0 / finfo.min float mask from a bool
            mask = torch.zeros(s, s).masked_fill(~causal_keep(s), torch.finfo(q.dtype).min)
        return attend(qk(q, k) * SCALE + mask, v)
    return core


def _mask_then_scale(q, k, v):
    s = q.shape[-2]
    scores = qk(q, k).masked_fill(~causal_keep(s, q.device), float("-inf"))
    return attend(scores / math.sqrt(D), v)


MASK_CORES = {
    "masked_fill-inf": _fill(float("-inf")),
    "masked_fill-finfo-min": _fill(torch.finfo(torch.float32).min),
    "where-keep-scores": _where("keep-scores"),
    "where-fill-first": _where("fill-first"),
    "where-full-like": _where("full-like"),
    "additive-triu-inf": _additive("triu-inf"),
    "additive-finfo-min": _additive("finfo-min"),
    "mask-then-scale": _mask_then_scale,
}


@pytest.mark.parametrize("name", list(MASK_CORES))
def test_mask_positive_and_numeric(name):
    model = Attn(MASK_CORES[name])
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.mask == "causal-mask", site.mask
    assert site.scale == pytest.approx(SCALE)
    assert_numeric(prog, model)


class PaddingAttn(Attn):
    """An additive padding mask [B, 1, 1, S] built from a model input."""

    def __init__(self):
        super().__init__(self.core_)

    def core_(self, q, k, v):
        return attend(qk(q, k) * SCALE + self.bias, v)

    def forward(self, x, keep):
        self.bias = (1.0 - keep[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return super().forward(x)


def _padding_inputs(b, s):
    keep = torch.ones(b, s, dtype=torch.long)
    keep[-1, : s // 2] = 0
    return (hidden(b, s), keep), {}


def test_padding_mask_from_input():
    model = PaddingAttn()
    prog = capture(model, *_padding_inputs(*SHAPES[0])[0])
    assert only_site(prog).mask == "padding"
    assert_numeric(prog, model, _padding_inputs)


@pytest.mark.parametrize("value", [0.0, -1e4, -100.0])
def test_negative_fill_is_not_a_masking_value(value):
    (reason,) = rejection_reasons(Attn(_fill(value)), hidden(*SHAPES[0]))
    assert "not a masking value" in reason and repr(value) in reason


def test_negative_where_between_two_computed_tensors():
    def core(q, k, v):
        s = q.shape[-2]
        scores = qk(q, k) * SCALE
        other = q.mean(-1, keepdim=True).expand_as(scores)  # computed, not a constant fill
        return attend(torch.where(causal_keep(s, q.device), scores, other), v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "selects between two computed tensors" in reason


# --- softcap ----------------------------------------------------------------------------------

CAP = 5.0


def _softcap(form):
    def core(q, k, v):
        s = q.shape[-2]
        scores = qk(q, k) * SCALE
        if form == "div":
            scores = torch.tanh(scores / CAP) * CAP
        else:
            scores = CAP * torch.tanh(scores * (1.0 / CAP))
        scores = scores.masked_fill(~causal_keep(s, q.device), float("-inf"))
        return attend(scores, v)
    return core


@pytest.mark.parametrize("form", ["div", "mul"])
def test_softcap_positive_and_numeric(form):
    model = Attn(_softcap(form))
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.softcap == pytest.approx(CAP)
    assert site.scale == pytest.approx(SCALE)
    assert site.mask == "causal-mask"
    assert_numeric(prog, model)


def test_negative_mask_added_before_softcap():
    def core(q, k, v):
        s = q.shape[-2]
        mask = torch.triu(torch.full((s, s), -1e30), diagonal=1)
        scores = qk(q, k) * SCALE + mask
        return attend(CAP * torch.tanh(scores / CAP), v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "mask is added before the tanh softcap" in reason


def test_negative_rescaled_after_softcap():
    def core(q, k, v):
        return attend(CAP * torch.tanh(qk(q, k) / CAP) * SCALE, v)

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "after the tanh softcap" in reason


# --- baddbmm ----------------------------------------------------------------------------------


def _baddbmm(alpha, beta):
    def core(q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
        bias = torch.triu(torch.full((s, s), -1e30), diagonal=1)[None]
        slope = torch.arange(s, dtype=q.dtype)[None, None, :] * 0.1  # a finite bias too
        scores = torch.baddbmm(bias + slope, q3, k3.transpose(1, 2), beta=beta, alpha=alpha)
        out = torch.bmm(F.softmax(scores, dim=-1), v3)
        return out.view(b, h, s, d)
    return core


@pytest.mark.parametrize("alpha,beta", [(SCALE, 1.0), (SCALE, 0.5), (1.0, 2.0)])
def test_baddbmm_positive_and_numeric(alpha, beta):
    model = Attn(_baddbmm(alpha, beta))
    prog = capture(model, hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.pattern == "baddbmm-softmax"
    assert site.num_heads == H
    assert site.scale == pytest.approx(alpha)
    assert_numeric(prog, model)
