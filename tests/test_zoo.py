"""The zoo, end to end through capture: every positive entry yields exactly its expected sites,
each backed by a canonical ``rewriter.attention`` node, with no attention left behind and the
canonicalized module numerically identical to the model at several shapes; every negative entry
is rejected with a reason. Captures are shared (one per entry and process)."""

from __future__ import annotations

import re

import pytest
import torch
from attn_testlib import (
    ATTENTION,
    CAPTURE_SHAPE,
    OTHER_SHAPES,
    SDPA,
    SOFTMAX,
    TOL,
    canonical_nodes,
    leftover_attention_ops,
)
from zoo import NEGATIVES, ZOO

import rewriter as rw


@pytest.fixture(scope="module", params=ZOO, ids=lambda e: e.name)
def cap(request, zoo_captured):
    """Module-scoped and parametrized, so pytest groups the tests of one entry together (and
    xdist mostly keeps them on one worker)."""
    return zoo_captured(request.param.name)


def _site_tuples(prog):
    return [(s.num_heads, s.num_kv_heads, s.head_dim) for s in prog.sites]


def test_finds_expected_sites(cap):
    assert _site_tuples(cap.prog) == list(cap.entry.sites)
    assert [s.index for s in cap.prog.sites] == list(range(len(cap.prog.sites)))
    assert all(s.pattern for s in cap.prog.sites)


def test_every_site_has_a_canonical_node(cap):
    nodes = {n.name: n for n in canonical_nodes(cap.prog)}
    assert len(nodes) == len(cap.prog.sites)
    for site in cap.prog.sites:
        assert site.node in nodes, f"site {site.index}: no node {site.node!r}"
        assert nodes[site.node].target is ATTENTION
    # The graph before canonicalization has none.
    assert not [n for n in cap.prog.original.graph.nodes if n.target is ATTENTION]


def test_no_attention_left_behind(cap):
    """The replaced cores are gone: no softmax or sdpa (kept alive by, e.g., an eval-mode
    dropout or sdpa's nondeterministic_seeded tag) computes next to the canonical node."""
    left = leftover_attention_ops(cap.prog)
    # Softmaxes that are not attention (MoE routers) stay; each one was rejected with a reason.
    rejected = {r.node: r.reason for r in cap.prog.rejected}
    others = [n for n in left if n.target in SOFTMAX and rejected.get(n.name, "").strip()]
    assert len(others) == cap.entry.other_softmax, [f"{n.name}: {rejected[n.name]}"
                                                   for n in others]
    left = [n for n in left if n not in others]
    assert not left, [f"{n.name} ({n.target})" for n in left]


@pytest.mark.parametrize("shape", [CAPTURE_SHAPE, *OTHER_SHAPES], ids=lambda s: f"b{s[0]}s{s[1]}")
def test_identity(cap, shape):
    args, kwargs = cap.entry.inputs(*shape)
    report = cap.prog.verify(cap.model, args, kwargs)
    assert report.max_rel <= TOL, str(report)


def test_identity_default_inputs(cap):
    """verify() with no arguments compares against the captured graph on the example inputs."""
    report = cap.prog.verify()
    assert report.ok and report.max_rel <= TOL, str(report)


def test_original_is_not_canonicalized(cap):
    """``prog.original`` keeps the model's own attention ops (one or more per site)."""
    ops = [n for n in cap.prog.original.graph.nodes if n.op == "call_function"
           and (n.target is SDPA or n.target in SOFTMAX)]
    assert len(ops) >= len(cap.entry.sites)


# --- negatives --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", NEGATIVES, ids=lambda e: e.name)
def test_negative_rejected(entry):
    model = entry.build()
    args, kwargs = entry.inputs(*CAPTURE_SHAPE)
    with pytest.raises(rw.NoAttentionError, match="no attention found"):
        rw.capture(model, args, kwargs)
    prog = rw.capture(model, args, kwargs, require_attention=False)
    assert prog.sites == []
    assert not canonical_nodes(prog)
    softmaxes = [n for n in prog.original.graph.nodes
                 if n.op == "call_function" and n.target in (torch.ops.aten.softmax.int,
                                                             torch.ops.aten._softmax.default)]
    assert [r.node for r in prog.rejected] == [n.name for n in softmaxes]
    assert all(r.reason.strip() for r in prog.rejected)
    # Still runs, unchanged.
    report = prog.verify(model, *entry.inputs(3, 9))
    assert report.max_rel == 0.0


def test_negative_attention_pooling_reason():
    (reason,) = _reasons("attention-pooling")
    assert re.search(r"learned|parameter", reason), reason
    assert "query" in reason


@pytest.mark.parametrize("name", ["moe-router", "classifier"])
def test_negative_logits_reason_says_not_a_product(name):
    (reason,) = _reasons(name)
    assert re.search(r"not (a|an) .*product|not attention", reason), reason


@pytest.mark.parametrize("name", ["moe-router", "classifier"])
def test_negative_logits_reason_names_the_linear(name):
    (reason,) = _reasons(name)
    assert "linear" in reason, reason


def _reasons(name):
    from zoo import get

    entry = get(name)
    prog = rw.capture(entry.build(), *entry.inputs(*CAPTURE_SHAPE), require_attention=False)
    return [r.reason for r in prog.rejected]


# --- site metadata -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-eager", "llama-sdpa"])
def test_llama_metadata(zoo_captured, name):
    prog = zoo_captured(name).prog
    for layer, site in enumerate(prog.sites):
        assert site.positional == "rope"
        assert site.kv_expansion == "repeat_kv"
        assert (site.num_heads, site.num_kv_heads) == (4, 2)
        assert site.q_proj is not None and site.q_proj.weight.endswith("q_proj.weight")
        assert site.k_proj.weight.endswith("k_proj.weight")
        assert site.v_proj.weight.endswith("v_proj.weight")
        assert site.o_proj is not None and site.o_proj.weight.endswith("o_proj.weight")
        assert site.q_proj.kind == "linear"
        assert len(site.k_proj.features) == 2  # per KV head
        assert site.layer == layer
        assert site.module_path == f"model.layers.{layer}.self_attn"
        assert site.cross is False
        assert site.scale == pytest.approx(8**-0.5)
        assert "causal" in site.mask


@pytest.mark.parametrize("name", ["gpt2-eager", "gpt2-sdpa"])
def test_gpt2_fused_conv1d(zoo_captured, name):
    for site in zoo_captured(name).prog.sites:
        projs = (site.q_proj, site.k_proj, site.v_proj)
        assert all(p is not None for p in projs)
        assert len({p.weight for p in projs}) == 1
        assert projs[0].weight.endswith("attn.c_attn.weight")
        assert all(p.kind == "conv1d" for p in projs)
        assert all(p.bias and p.bias.endswith("attn.c_attn.bias") for p in projs)
        flats = [[f for head in p.features for f in head] for p in projs]
        for flat in flats:  # contiguous
            assert flat == list(range(flat[0], flat[0] + len(flat)))
        assert [f[0] for f in flats] == [0, 32, 64]
        assert not set(flats[0]) & set(flats[1]) and not set(flats[1]) & set(flats[2])
        assert all(p.fused for p in projs[1:])
        assert site.o_proj is not None and site.o_proj.kind == "conv1d"


@pytest.mark.parametrize("name", ["gpt-neox-eager", "gpt-neox-sdpa"])
def test_gpt_neox_interleaved(zoo_captured, name):
    for site in zoo_captured(name).prog.sites:
        q, k, v = site.q_proj, site.k_proj, site.v_proj
        assert len({q.weight, k.weight, v.weight}) == 1
        assert q.weight.endswith("attention.query_key_value.weight")
        assert all("interleaved" in p.describe() for p in (q, k, v))
        d = 8
        # [B, S, H, 3D] chunk(3): head h reads q = h*3D + [0, D), k = +D, v = +2D.
        for h in range(4):
            assert q.features[h] == tuple(range(3 * d * h, 3 * d * h + d))
            assert k.features[h] == tuple(range(3 * d * h + d, 3 * d * h + 2 * d))
            assert v.features[h] == tuple(range(3 * d * h + 2 * d, 3 * d * h + 3 * d))
        # q's heads are not contiguous with each other (k and v sit in between).
        assert q.features[1][0] - q.features[0][-1] > 1
        used = [f for p in (q, k, v) for head in p.features for f in head]
        assert sorted(used) == list(range(3 * 4 * d))
        assert site.positional == "rope-partial"


@pytest.mark.parametrize("name", ["t5-eager", "t5-sdpa"])
def test_t5_cross_and_relative_bias(zoo_captured, name):
    sites = zoo_captured(name).prog.sites
    assert [s.cross for s in sites] == [False, False, False, True, False, True]
    for site in sites:
        assert site.scale == 1.0
        if site.cross:
            assert "EncDecAttention" in site.module_path
        else:
            assert "relative-bias" in site.mask, site.mask
            assert "SelfAttention" in site.module_path


@pytest.mark.parametrize("name", ["whisper-eager", "whisper-sdpa"])
def test_whisper_cross(zoo_captured, name):
    sites = zoo_captured(name).prog.sites
    assert [s.cross for s in sites] == [False, False, False, True, False, True]
    assert [s.module_path.split(".", 1)[0] for s in sites] == ["encoder"] * 2 + ["decoder"] * 4
    for site in sites:
        assert ("encoder_attn" in site.module_path) == site.cross
        # q is pre-scaled by D**-0.5 and sdpa gets scale=1: the product is 1/sqrt(D) overall.
        assert site.scale == pytest.approx(1.0) or site.scale == pytest.approx(8**-0.5)


def test_gemma2_softcap(zoo_captured):
    for site in zoo_captured("gemma2-eager").prog.sites:
        assert site.softcap == pytest.approx(50.0)
        assert site.positional == "rope"
        assert site.kv_expansion == "repeat_kv"


@pytest.mark.parametrize("name", ["mha", "mha-weights", "transformer-encoder-layer"])
def test_mha_in_proj_slices(zoo_captured, name):
    (site,) = zoo_captured(name).prog.sites
    q, k, v = site.q_proj, site.k_proj, site.v_proj
    assert all(p.weight.endswith("in_proj_weight") for p in (q, k, v))
    assert [p.describe().rsplit("[", 1)[1] for p in (q, k, v)] == ["0:32]", "32:64]", "64:96]"]
    assert all(p.bias and p.bias.endswith("in_proj_bias") for p in (q, k, v))
    assert site.o_proj is not None and site.o_proj.weight.endswith("out_proj.weight")


@pytest.mark.parametrize("name,kind", [("repeat-kv", "repeat_kv"),
                                       ("repeat-interleave", "repeat_interleave"),
                                       ("sdpa-enable-gqa", "enable_gqa")])
def test_hand_gqa_metadata(zoo_captured, name, kind):
    (site,) = zoo_captured(name).prog.sites
    assert site.kv_expansion == kind
    assert site.kv_group == 2
    assert site.k_proj is not None and len(site.k_proj.features) == 2


@pytest.mark.parametrize("name,pattern", [
    ("einsum", "einsum-softmax"), ("einsum-bshd", "einsum-softmax"), ("bmm", "bmm-softmax"),
    ("baddbmm", "baddbmm-softmax"), ("mha-weights", "bmm-softmax"), ("sdpa-causal", "sdpa"),
    ("llama-eager", "matmul-softmax"), ("llama-sdpa", "sdpa"),
])
def test_pattern_names(zoo_captured, name, pattern):
    assert {s.pattern for s in zoo_captured(name).prog.sites} == {pattern}


def test_summary_lists_every_site(zoo_captured):
    prog = zoo_captured("t5-eager").prog
    text = prog.summary()
    assert text.count("EncDecAttention") == 2
    assert "relative-bias" in text


# --- more architectures (issue #16 item 5) ----------------------------------------------------


@pytest.mark.parametrize("name", ["gptj-eager", "gptj-sdpa", "codegen-eager", "codegen-sdpa"])
def test_interleaved_partial_rope_keeps_projections(zoo_captured, name):
    """GPT-J / CodeGen write x[:, :, :, :r] and x[:, :, :, r:] with explicit full slices: the
    partial RoPE is still recognized and q/k are traced through it to their projections."""
    for site in zoo_captured(name).prog.sites:
        assert site.positional == "rope-partial"
        assert all(p is not None for p in (site.q_proj, site.k_proj, site.v_proj, site.o_proj))
        assert len(site.q_proj.features) == len(site.k_proj.features) == 4


@pytest.mark.parametrize("name", ["falcon-eager", "falcon-sdpa"])
def test_falcon_head_copies(zoo_captured, name):
    """K/V broadcast to the query heads before RoPE: one head per group goes to the node."""
    for site in zoo_captured(name).prog.sites:
        assert site.kv_expansion == "head-copies"
        assert (site.num_heads, site.num_kv_heads, site.kv_group) == (4, 2, 2)
        assert site.positional == "rope"


@pytest.mark.parametrize("name", ["mixtral-eager", "mixtral-sdpa"])
def test_mixtral_router_rejected(zoo_captured, name):
    prog = zoo_captured(name).prog
    assert len(prog.rejected) == 2
    assert [r.module_path for r in prog.rejected] == [f"model.layers.{i}.mlp.gate"
                                                      for i in range(2)]
    assert all("not attention" in r.reason for r in prog.rejected)


@pytest.mark.parametrize("name", ["granite-eager", "granite-sdpa"])
def test_granite_attention_multiplier_is_the_scale(zoo_captured, name):
    for site in zoo_captured(name).prog.sites:
        assert site.scale == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["bart-eager", "bart-sdpa"])
def test_bart_cross(zoo_captured, name):
    sites = zoo_captured(name).prog.sites
    assert [s.cross for s in sites] == [False, False, False, True, False, True]
    assert all(("encoder_attn" in s.module_path) == s.cross for s in sites)
    assert all(s.scale == pytest.approx(8**-0.5) for s in sites)
