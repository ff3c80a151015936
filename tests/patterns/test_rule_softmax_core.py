"""SOFTMAX_CORE: ``softmax(q @ k^T * scale) @ v`` written out by the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from attn_testlib import (
    SHAPES,
    Attn,
    D,
    E,
    H,
    assert_numeric,
    capture,
    hidden,
    leftover_attention_ops,
    only_site,
    rejection_reasons,
)
from torch import nn


def matmul_core(q, k, v):
    scores = torch.matmul(q, k.transpose(-2, -1)) * D**-0.5
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def test_positive_matmul_softmax():
    prog = capture(Attn(matmul_core), hidden(*SHAPES[0]))
    site = only_site(prog)
    assert site.pattern == "matmul-softmax"
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.v_head_dim) == (H, H, D, D)
    assert site.scale == pytest.approx(D**-0.5)
    assert (site.mask, site.softcap, site.kv_expansion, site.is_causal) == \
        ("none", 0.0, "none", False)
    assert site.q_proj.weight == "q_proj.weight" and site.o_proj.weight == "o_proj.weight"
    assert prog.rejected == []
    assert leftover_attention_ops(prog) == []


def test_positive_fp32_softmax_cast_and_eval_dropout():
    def core(q, k, v):
        scores = q @ k.transpose(-1, -2) * D**-0.5
        p = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return F.dropout(p, p=0.1, training=False) @ v

    site = only_site(capture(Attn(core), hidden(*SHAPES[0])))
    assert site.pattern == "matmul-softmax" and site.dropout == 0.0


def test_positive_softmax_dim_3_is_last():
    def core(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=3) @ v

    assert only_site(capture(Attn(core), hidden(*SHAPES[0]))).scale == pytest.approx(D**-0.5)


def test_negative_softmax_not_over_last_dim():
    def core(q, k, v):  # normalizes over heads
        return torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=1) @ v

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "not over the last dimension" in reason


def test_negative_probabilities_returned():
    def core(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
        return p @ v, p  # attention weights are a model output

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "used outside" in reason


def test_negative_probabilities_reused():
    def core(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
        return p @ v + p.mean()

    (reason,) = rejection_reasons(Attn(core), hidden(*SHAPES[0]))
    assert "used outside" in reason


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(E, 4, bias=False)
        self.experts = nn.Linear(E, 4 * E)

    def forward(self, x):
        gates = F.softmax(self.router(x), dim=-1)  # [B, S, 4]
        outs = self.experts(x).unflatten(-1, (4, E))  # [B, S, 4, E]
        return (gates.unsqueeze(-1) * outs).sum(-2)


def test_negative_router_softmax_of_linear():
    (reason,) = rejection_reasons(Router().eval(), hidden(*SHAPES[0]))
    assert "linear" in reason


def test_negative_router_reason_says_not_a_product():
    (reason,) = rejection_reasons(Router().eval(), hidden(*SHAPES[0]))
    assert "product" in reason or "not attention" in reason, reason


class LearnedQuery(nn.Module):
    """Attention pooling: a learned query attends over the sequence."""

    def __init__(self, learned: str = "query"):
        super().__init__()
        torch.manual_seed(0)
        self.learned = learned
        self.latent = nn.Parameter(torch.randn(1, 3, E))
        self.proj = nn.Linear(E, E)
        self.v_proj = nn.Linear(E, E)

    def forward(self, x):
        if self.learned == "query":
            q, k = self.latent, self.proj(x)
        else:
            q, k = self.proj(x), self.latent
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E), dim=-1)
        return w @ self.v_proj(x if self.learned == "query" else self.latent.expand_as(x[:, :3]))


@pytest.mark.parametrize("learned", ["query", "key"])
def test_negative_learned_parameter(learned):
    (reason,) = rejection_reasons(LearnedQuery(learned).eval(), hidden(*SHAPES[0]))
    assert "learned parameter" in reason and learned in reason


@pytest.mark.parametrize("core", [
    matmul_core,
    lambda q, k, v: (q @ k.mT * D**-0.5).softmax(-1) @ v,
    lambda q, k, v: F.softmax((q @ k.transpose(2, 3)).float() / math.sqrt(D), -1).type_as(q) @ v,
], ids=["matmul", "operator-mT", "float-cast"])
def test_numeric(core):
    model = Attn(core)
    prog = capture(model, hidden(*SHAPES[0]))
    only_site(prog)
    assert_numeric(prog, model)
