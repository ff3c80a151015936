"""MaskSpec: parsing, and property tests of every derived form against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter.errors import SpecError
from rewriter.ir.masks import EMPTY, FULL, PARTIAL, MaskSpec, causal_mask


def brute_keep(spec: MaskSpec, h: int, i: int, j: int, sq: int, sk: int) -> bool:
    """The definition, one element at a time."""
    if spec.window is None:
        return True
    window = spec.window
    if spec.heads is not None:
        entries = spec.heads.split("/") if "/" in spec.heads else list(spec.heads)
        if entries[h] == "f":
            return True
        window = spec.window if entries[h] == "s" else int(entries[h])
    pos = i + sk - sq
    dist = pos - j
    keep = abs(dist) < window and dist % spec.dilation == 0
    return keep or j < spec.sink


@st.composite
def specs(draw, num_heads: int = 3):
    window = draw(st.one_of(st.none(), st.integers(1, 12)))
    if window is None:
        return MaskSpec()
    sink = draw(st.integers(0, 4))
    dilation = draw(st.integers(1, 3))
    letters = st.text("fs", min_size=num_heads, max_size=num_heads)
    windows = st.lists(st.one_of(st.just("f"), st.just("s"), st.integers(1, 12).map(str)),
                       min_size=num_heads, max_size=num_heads).map("/".join)
    heads = draw(st.one_of(st.none(), letters, windows))
    return MaskSpec(window, sink, dilation, heads)


@settings(max_examples=60, deadline=None)
@given(spec=specs(), sq=st.integers(1, 17), extra=st.integers(0, 9))
def test_dense_matches_brute_force(spec, sq, extra):
    sk = sq + extra
    dense = spec.dense(sq, sk, num_heads=3)
    for h in range(dense.shape[0]):
        for i in range(sq):
            for j in range(sk):
                assert bool(dense[h, i, j]) == brute_keep(spec, h, i, j, sq, sk)


@settings(max_examples=60, deadline=None)
@given(spec=specs(), sq=st.integers(1, 20), extra=st.integers(0, 9),
       tq=st.integers(1, 6), tk=st.integers(1, 6), causal=st.booleans())
def test_tile_map_and_density_match_brute_force(spec, sq, extra, tq, tk, causal):
    sk = sq + extra
    keep = spec.dense(sq, sk, num_heads=3)
    if causal:
        keep = keep & causal_mask(sq, sk)
    tiles = spec.tile_map(sq, sk, tq, tk, num_heads=3, causal=causal)
    for h in range(tiles.shape[0]):
        for a in range(tiles.shape[1]):
            for b in range(tiles.shape[2]):
                block = keep[h, a * tq:(a + 1) * tq, b * tk:(b + 1) * tk]
                want = EMPTY if not block.any() else FULL if block.all() else PARTIAL
                assert int(tiles[h, a, b]) == want
    if causal:
        base = causal_mask(sq, sk)
        want = float((keep & base).sum()) / (float(base.sum()) * keep.shape[0])
    else:
        want = float(keep.float().mean())
    assert spec.density(sq, sk, num_heads=3, causal=causal) == pytest.approx(want)


@settings(max_examples=40, deadline=None)
@given(spec=specs())
def test_format_parse_roundtrip(spec):
    assert MaskSpec.parse(spec.format()) == spec


def test_mask_mod_broadcasts_like_flex_attention():
    spec = MaskSpec(window=3, sink=1)
    q = torch.arange(6).view(6, 1)
    k = torch.arange(6).view(1, 6)
    assert torch.equal(spec.mask_mod(0, 0, q, k), spec.dense(6, 6)[0])


def test_window_covering_the_sequence_is_dense():
    assert MaskSpec(window=8).dense(8, 8).all()
    assert MaskSpec(window=8).density(8, 8, causal=True) == 1.0


@pytest.mark.parametrize("text, message", [
    ("window=0", "positive"),
    ("window=4,sink=-1", ">= 0"),
    ("dilation=2", "needs a window"),
    ("window=4,heads=fx", "f or s"),
    ("window=4,heads=f/0", "f or s"),
    ("heads=ff", "needs a window"),
    ("window=4,block=2", "unknown item"),
    ("window=four", "not an integer"),
])
def test_bad_specs_raise_one_line_errors(text, message):
    with pytest.raises(SpecError, match=message) as err:
        MaskSpec.parse(text)
    assert "\n" not in str(err.value)


def test_heads_table_length_must_match():
    with pytest.raises(SpecError, match="3 entries for 4 heads"):
        MaskSpec(window=2, heads="fsf").dense(4, 4, num_heads=4)


@pytest.mark.parametrize("causal, mask", [(True, None), (False, "bool"), (False, "float")])
def test_mixed_head_table_runs_per_part_and_matches_reference(causal, mask):
    """A per-KV-head table (sparse:heads=auto's output) runs full heads on SDPA's causal kernel
    and windowed heads block-sparse (long enough for it: 600 x 600), equal to the reference."""
    from rewriter.ir.ops import _head_parts, attention, reference_attention

    g = torch.Generator().manual_seed(0)
    sparsity = "window=64,sink=4,heads=s/s/f/f/f/f/s/32"  # KV heads 0, 3 stream; 1, 2 full
    parts = _head_parts(sparsity, 8, 4)
    assert [p[1] for p in parts] == [[0, 3], [1, 2]]
    assert parts[0][2] == "window=64,sink=4,heads=s/s/s/32" and parts[1][2] == ""
    assert _head_parts("window=64,heads=sfffffff", 8, 4) is None  # KV head 0 mixes kinds
    q = torch.randn(2, 8, 600, 16, generator=g)
    k, v = (torch.randn(2, 4, 600, 16, generator=g) for _ in range(2))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(600, 600, generator=g) > 0.1
    elif mask == "float":
        attn_mask = torch.randn(1, 1, 600, 600, generator=g)
    got = attention(q, k, v, attn_mask, scale=0.25, is_causal=causal, sparsity=sparsity)
    want = reference_attention(q, k, v, attn_mask, scale=0.25, is_causal=causal,
                               sparsity=sparsity)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_kv_head_parts():
    spec = MaskSpec.parse("window=64,sink=4,heads=s/s/f/f/32/32/s/s")
    parts = spec.kv_head_parts(8, 4)
    assert [(p[1], p[2].format()) for p in parts] == [
        ([0, 2, 3], "window=64,sink=4,heads=s/s/32/32/s/s"), ([1], "")]
    assert MaskSpec.parse("window=64,heads=s/f/f/f").kv_head_parts(4, 2) \
        is None  # KV head 0 has a windowed and a full query head
    assert MaskSpec.parse("window=64").kv_head_parts(4, 2) is None
