"""Neighbourhood masks (``neighborhood=K,dilation=D,grid=HxW|TxHxW,global=N``): the MaskSpec
against a brute-force definition and NATTEN's published window rule, the block-sparse eager
path against the naive reference, and ``sparse:neighborhood=K`` on a ViT end to end."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter as rw
import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.errors import SpecError
from rewriter.ir import blocksparse
from rewriter.ir.masks import EMPTY, FULL, PARTIAL, MaskSpec, causal_mask
from rewriter.ir.ops import reference_attention

zoo = pytest.importorskip("zoo")

# --- the definition, one element at a time ---------------------------------------------------


def axis_neighbors(x: int, length: int, kernel: int, dilation: int) -> set[int]:
    """Positions on one axis that a query at x reads: its sub-grid (positions = x mod D) in
    order, the K of them centred on x, shifted inward at the borders; all of a shorter one."""
    sub = list(range(x % dilation, length, dilation))
    if len(sub) <= kernel:
        return set(sub)
    i = sub.index(x)
    start = min(max(i - kernel // 2, 0), len(sub) - kernel)
    return set(sub[start:start + kernel])


def unravel(cell: int, grid: tuple[int, ...]) -> list[int]:
    coords = []
    for length in reversed(grid):
        cell, c = divmod(cell, length)
        coords.append(c)
    return coords[::-1]


def brute_keep(spec: MaskSpec, i: int, j: int, sq: int, sk: int) -> bool:
    pos, n = i + sk - sq, spec.globals_
    if pos < n or j < n:
        return True
    return all(y in axis_neighbors(x, length, spec.neighborhood, spec.dilation)
               for x, y, length in zip(unravel(pos - n, spec.grid), unravel(j - n, spec.grid),
                                       spec.grid, strict=True))


def natten_window_start(x: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's get_window_start (csrc natten_commons / the naive kernels, v0.14-0.17), in
    original coordinates, defined for length >= kernel * dilation."""
    nb = kernel // 2
    if dilation <= 1:
        return max(x - nb, 0) + (x + nb >= length) * (length - x - nb - 1)
    if x - nb * dilation < 0:
        return x % dilation
    if x + nb * dilation >= length:
        imodd = x % dilation
        a = length // dilation * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dilation
        return a + imodd - kernel * dilation
    return x - nb * dilation


@st.composite
def neighborhoods(draw, dims: int):
    grid = tuple(draw(st.integers(1, 7 if dims == 2 else 4)) for _ in range(dims))
    return MaskSpec(neighborhood=draw(st.sampled_from([1, 3, 5])),
                    dilation=draw(st.integers(1, 3)), grid=grid,
                    globals_=draw(st.integers(0, 2)))


@pytest.mark.parametrize("dims", [2, 3])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_dense_matches_brute_force(dims, data):
    spec = data.draw(neighborhoods(dims))
    sk = spec.tokens
    sq = data.draw(st.integers(1, sk))  # bottom-right: the last sq tokens query
    dense = spec.dense(sq, sk)
    assert dense.shape == (1, sq, sk)
    for i in range(sq):
        for j in range(sk):
            assert bool(dense[0, i, j]) == brute_keep(spec, i, j, sq, sk), (spec, i, j)


@settings(max_examples=40, deadline=None)
@given(spec=neighborhoods(2), tq=st.integers(1, 9), tk=st.integers(1, 9),
       causal=st.booleans())
def test_tile_map_and_density(spec, tq, tk, causal):
    n = spec.tokens
    keep = spec.dense(n, n) & (causal_mask(n, n) if causal else True)
    tiles = spec.tile_map(n, n, tq, tk, causal=causal)
    for a in range(tiles.shape[1]):
        for b in range(tiles.shape[2]):
            block = keep[0, a * tq:(a + 1) * tq, b * tk:(b + 1) * tk]
            want = EMPTY if not block.any() else FULL if block.all() else PARTIAL
            assert int(tiles[0, a, b]) == want
    base = causal_mask(n, n) if causal else torch.ones(n, n, dtype=torch.bool)
    assert spec.density(n, n, causal=causal) == pytest.approx(
        float((keep & base).sum()) / float(base.sum()))


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_axis_rule_is_nattens_window_start(kernel, dilation):
    """Where NATTEN defines it (length >= K * D), a query at x reads the K positions
    start + i * D of NATTEN's get_window_start; MaskSpec on a 1 x L grid does the same."""
    for length in range(kernel * dilation, kernel * dilation + 9):
        spec = MaskSpec(neighborhood=kernel, dilation=dilation, grid=(1, length))
        dense = spec.dense(length, length)[0]
        for x in range(length):
            start = natten_window_start(x, length, kernel, dilation)
            natten = {start + i * dilation for i in range(kernel)}
            assert axis_neighbors(x, length, kernel, dilation) == natten
            assert set(dense[x].nonzero().flatten().tolist()) == natten, (length, x)


def _seen(spec: MaskSpec, row: int, col: int) -> torch.Tensor:
    """[H, W] int: what the grid query at (row, col) reads of the grid."""
    n, (_, width) = spec.globals_, spec.grid
    keep = spec.dense(spec.tokens, spec.tokens)[0]
    return keep[n + row * width + col, n:].view(spec.grid).int()


def test_natten_published_cases_by_hand():
    """5x5 grid, K=3 (NATTEN's figures): a corner sees the 3x3 corner block, an edge query is
    shifted inward, the centre sees its own 3x3. With global=1 the CLS token reads and is read
    by everything."""
    spec = MaskSpec.parse("neighborhood=3,grid=5x5,global=1")
    corner = torch.zeros(5, 5, dtype=torch.int)
    corner[0:3, 0:3] = 1  # query (0, 0): rows 0-2, cols 0-2
    assert torch.equal(_seen(spec, 0, 0), corner)
    edge = torch.zeros(5, 5, dtype=torch.int)
    edge[0:3, 1:4] = 1  # query (0, 2): rows shifted inward to 0-2, cols 1-3
    assert torch.equal(_seen(spec, 0, 2), edge)
    far = torch.zeros(5, 5, dtype=torch.int)
    far[2:5, 2:5] = 1  # query (4, 4): rows 2-4, cols 2-4
    assert torch.equal(_seen(spec, 4, 4), far)
    mid = torch.zeros(5, 5, dtype=torch.int)
    mid[1:4, 1:4] = 1
    assert torch.equal(_seen(spec, 2, 2), mid)
    keep = spec.dense(26, 26)[0]
    assert keep[0].all() and keep[:, 0].all()  # the global token
    assert int(keep[1:, 1:].sum(-1).min()) == 9  # every grid query reads exactly K*K cells


def test_dilated_cases_by_hand():
    """7x7, K=3, D=2 (DiNAT): each axis splits into sub-grids {0,2,4,6} and {1,3,5}."""
    spec = MaskSpec.parse("neighborhood=3,dilation=2,grid=7x7")

    def cells(rows, cols):
        out = torch.zeros(7, 7, dtype=torch.int)
        for r in rows:
            for c in cols:
                out[r, c] = 1
        return out

    assert torch.equal(_seen(spec, 0, 0), cells([0, 2, 4], [0, 2, 4]))
    assert torch.equal(_seen(spec, 1, 1), cells([1, 3, 5], [1, 3, 5]))  # the short sub-grid
    assert torch.equal(_seen(spec, 6, 6), cells([2, 4, 6], [2, 4, 6]))
    assert torch.equal(_seen(spec, 3, 2), cells([1, 3, 5], [0, 2, 4]))


def test_three_d_grid_reads_frames_around():
    spec = MaskSpec.parse("neighborhood=3,grid=4x3x3")
    keep = spec.dense(36, 36)[0]
    seen = keep[1 * 9 + 1 * 3 + 1].view(4, 3, 3)  # frame 1, centre
    assert seen[0:3].all() and not seen[3].any()


@settings(max_examples=30, deadline=None)
@given(spec=st.one_of(neighborhoods(2), neighborhoods(3)))
def test_format_parse_roundtrip(spec):
    text = spec.format()
    assert MaskSpec.parse(text) == spec
    assert text.startswith(f"neighborhood={spec.neighborhood}") and "grid=" in text
    assert not spec.is_dense


@pytest.mark.parametrize("text, message", [
    ("neighborhood=2,grid=4x4", "odd positive"),
    ("neighborhood=0,grid=4x4", "odd positive"),
    ("neighborhood=3", "needs grid="),
    ("neighborhood=3,grid=4x4,window=2", "excludes window"),
    ("neighborhood=3,grid=4x4,sink=1", "excludes window"),
    ("grid=4x4", "go with neighborhood"),
    ("global=1", "go with neighborhood"),
    ("neighborhood=3,grid=4", "HxW or TxHxW"),
    ("neighborhood=3,grid=4x0", "HxW or TxHxW"),
    ("neighborhood=3,grid=2x2x2x2", "HxW or TxHxW"),
    ("neighborhood=3,grid=4x4,global=-1", ">= 0"),
])
def test_bad_specs_raise_one_line_errors(text, message):
    with pytest.raises(SpecError, match=message) as err:
        MaskSpec.parse(text)
    assert "\n" not in str(err.value)


def test_token_count_must_match_the_grid():
    spec = MaskSpec.parse("neighborhood=3,grid=4x4,global=1")
    with pytest.raises(SpecError, match="17 tokens, the attention has 16 queries over 16"):
        spec.dense(16, 16)
    with pytest.raises(SpecError, match="17 tokens"):
        spec.dense(18, 17)  # more queries than keys


# --- block-sparse eager attention -------------------------------------------------------------


def _qkv(b, hq, hkv, sq, sk, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, sk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, sk, d + 4, generator=g, dtype=dtype))


def _masks(kind: str, b: int, hq: int, sq: int, sk: int):
    g = torch.Generator().manual_seed(7)
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(b, 1, 1, sk, generator=g) > 0.2  # padding-like
    if kind == "bool-2d":
        return torch.rand(sq, sk, generator=g) > 0.3
    mask = torch.randn(b, hq, sq, sk, generator=g)
    mask[0, :, 1] = float("-inf")  # a row the model empties
    mask[-1, :, :, :3] = torch.finfo(torch.float32).min  # HF padding: finite
    return mask


BLOCK_CASES = [
    # sparsity, (B, Hq, Hkv, Sq, Sk), is_causal, model mask
    ("window=8", (1, 2, 2, 70, 70), False, "none"),
    ("window=8,sink=3", (2, 4, 2, 70, 70), True, "bool"),
    ("window=6,dilation=2", (2, 4, 4, 50, 50), False, "float"),
    ("window=5,heads=f/3/s/8", (1, 4, 2, 40, 50), True, "bool-2d"),
    ("window=4,sink=2", (1, 4, 1, 20, 70), True, "float"),  # Sq < Sk: bottom-right window
    ("window=2", (1, 2, 1, 30, 10), False, "none"),  # Sq > Sk: first rows read nothing
    ("neighborhood=3,grid=6x7,global=1", (2, 4, 2, 43, 43), False, "float"),
    ("neighborhood=5,dilation=2,grid=7x6", (1, 2, 2, 42, 42), True, "bool"),
    ("neighborhood=3,dilation=2,grid=3x4x5,global=2", (1, 4, 4, 62, 62), False, "none"),
    ("neighborhood=3,grid=5x6,global=1", (2, 4, 2, 17, 31), False, "bool"),  # last 17 tokens
]


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("sparsity, shape, causal, mask", BLOCK_CASES,
                         ids=[c[0] for c in BLOCK_CASES])
def test_blocksparse_equals_reference(sparsity, shape, causal, mask, block):
    b, hq, hkv, sq, sk = shape
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    attn_mask = _masks(mask, b, hq, sq, sk)
    attrs = {"scale": 0.3, "is_causal": causal, "sparsity": sparsity}
    got = blocksparse.attention(q, k, v, attn_mask, block=block, **attrs)
    want = reference_attention(q, k, v, attn_mask, **attrs)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-6 * max(1.0, float(want.abs().max()))
    # float64: agreement to 1e-12, not just to fp32 rounding
    to64 = (lambda t: t if t is None or t.dtype == torch.bool else t.double())
    exact = blocksparse.attention(*map(to64, (q, k, v, attn_mask)), block=block, **attrs)
    ref = reference_attention(*map(to64, (q, k, v, attn_mask)), **attrs)
    assert (exact - ref).abs().max() <= 1e-12


def test_neighborhood_blocks_read_a_band_of_grid_rows():
    """8x8 grid + CLS, K=3: the CLS query is a block of its own reading every key; each block
    of two grid rows reads the CLS key plus the grid rows around it, one contiguous range."""
    spec = "neighborhood=3,grid=8x8,global=1"
    bounds = blocksparse.block_bounds(spec, 65, 65, block=16)
    assert bounds == (0, 1, 17, 33, 49, 65)  # CLS, then two grid rows per block
    plan = blocksparse.plan(spec, 65, 65, 1, False, bounds, "cpu", "float32")
    first, *rows = plan.blocks
    assert first.keys == ((0, 65),) and first.bias is None  # CLS reads every key
    assert [b.keys for b in rows] == [((0, 1 + 3 * 8),),  # grid rows 0-1 read CLS + rows 0-2
                                      ((0, 1), (1 + 1 * 8, 1 + 5 * 8)),  # 2-3 read 1-4
                                      ((0, 1), (1 + 3 * 8, 1 + 7 * 8)),  # 4-5 read 3-6
                                      ((0, 1), (1 + 5 * 8, 65))]  # 6-7 read 5-7
    assert plan.gathered < 0.6


def test_op_takes_the_block_path_when_worthwhile(monkeypatch):
    spec = "neighborhood=3,grid=24x24,global=1"  # 577 tokens, 577^2 > 2^18
    assert blocksparse.worthwhile(spec, 577, 577, 4, False)
    assert not blocksparse.worthwhile("neighborhood=3,grid=6x6,global=1", 37, 37, 4, False)
    assert not blocksparse.worthwhile("window=400", 577, 577, 4, False)  # gathers too much
    calls = []
    real = blocksparse.attention
    monkeypatch.setattr(blocksparse, "attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 4, 2, 577, 577)
    got = torch.ops.rewriter.attention(q, k, v, scale=0.25, sparsity=spec)
    assert calls
    want = reference_attention(q, k, v, scale=0.25, sparsity=spec)
    assert (got - want).abs().max() <= 2e-6


@pytest.mark.parametrize("sparsity", ["neighborhood=3,dilation=2,grid=3x4,global=1",
                                      "window=3,sink=1"])
def test_block_path_keeps_gradients(monkeypatch, sparsity):
    """The op's forward takes the block path (thresholds lowered), its backward is the
    reference math: gradcheck holds the two together in float64."""
    monkeypatch.setattr(blocksparse, "MIN_PAIRS", 0)
    monkeypatch.setattr(blocksparse, "MAX_GATHERED", 1.0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 13, 13, d=2, dtype=torch.float64))
    mask = torch.randn(1, 1, 1, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.rewriter.attention(*t, scale=0.7, sparsity=sparsity), (q, k, v, mask))


# --- sparse:neighborhood=K on a ViT ----------------------------------------------------------

GRID = 6  # 36 patches + CLS


@pytest.fixture(scope="module")
def vit():
    entry = zoo.vit(GRID)
    model = entry.build()
    args, kwargs = entry.inputs(2, 0)
    return model, rw.capture(model, args, kwargs), kwargs


def _hf_with_mask(model, kwargs, spec: MaskSpec, monkeypatch):
    """The HF model run eagerly, its attention given the brute-force keep-mask as -inf: the
    independent reference."""
    import transformers.models.vit.modeling_vit as modeling

    n = spec.tokens
    keep = torch.tensor([[brute_keep(spec, i, j, n, n) for j in range(n)] for i in range(n)])
    bias = torch.zeros(n, n).masked_fill(~keep, float("-inf"))

    class Interface:
        @staticmethod
        def get_interface(name, default):
            def masked(module, q, k, v, attention_mask, **kw):
                assert attention_mask is None
                return modeling.eager_attention_forward(module, q, k, v, bias, **kw)
            return masked

    monkeypatch.setattr(modeling, "ALL_ATTENTION_FUNCTIONS", Interface)
    with torch.no_grad():
        return model(**kwargs).last_hidden_state


@pytest.mark.parametrize("text, want", [
    ("sparse:neighborhood=3", "neighborhood=3,grid=6x6,global=1"),
    ("sparse:neighborhood=5,dilation=2", "neighborhood=5,dilation=2,grid=6x6,global=1"),
])
def test_vit_end_to_end(vit, monkeypatch, text, want):
    model, prog, kwargs = vit
    new = rw.rewrite(prog, text)
    assert [s.sparsity for s in new.sites] == [want] * len(prog.sites)
    assert [s.sparsity for s in prog.sites] == [""] * len(prog.sites)  # input unchanged
    with torch.no_grad():
        got = new.module(**kwargs).last_hidden_state
    expected = _hf_with_mask(model, kwargs, MaskSpec.parse(want), monkeypatch)
    assert (got - expected).abs().max() <= 1e-5 * float(expected.abs().max())
    monkeypatch.setattr(blocksparse, "MIN_PAIRS", 0)  # the block path gives the same
    monkeypatch.setattr(blocksparse, "MAX_GATHERED", 1.0)
    with torch.no_grad():
        blocked = new.module(**kwargs).last_hidden_state
    assert (blocked - expected).abs().max() <= 1e-5 * float(expected.abs().max())
    acc = new.accounting()
    site = acc["sites"][0]
    assert site["ctx"] == GRID * GRID + 1
    assert site["density"] == pytest.approx(MaskSpec.parse(want).density(37, 37))
    assert acc["attention_density"] < 1.0


def test_rewrite_module_directly_and_explicit_keys():
    entry = zoo.vit(GRID)
    args, kwargs = entry.inputs(1, 0)
    new = rw.rewrite(entry.build(), "sparse:neighborhood=3,grid=6x6,global=1,layers=1",
                     args=args, kwargs=kwargs)
    assert [s.sparsity for s in new.sites] == ["", "neighborhood=3,grid=6x6,global=1"]


@pytest.mark.parametrize("text, message", [
    ("sparse:neighborhood=4", "odd positive integer"),
    ("sparse:neighborhood=3,window=4", "does not take window="),
    ("sparse:neighborhood=3,sink=1", "does not take sink="),
    ("sparse:neighborhood=3,topk=2", "does not take topk="),
    ("sparse:grid=6x6", "only go with neighborhood=K"),
    ("sparse:neighborhood=3,grid=6", "HxW or TxHxW"),
    ("sparse:neighborhood=3,grid=7x7", "has 37 tokens, the grid 7x7 has 49"),
    ("sparse:neighborhood=3,grid=6x6,global=2", "plus global=2"),
])
def test_bad_neighborhood_specs(vit, text, message):
    _, prog, _ = vit
    with pytest.raises(SpecError, match=message) as err:
        rw.rewrite(prog, text)
    assert "\n" not in str(err.value)


def test_no_patch_embedding_needs_grid(zoo_captured):
    prog = zoo_captured("mha").prog
    with pytest.raises(SpecError, match="no patch embedding .* give grid=HxW"):
        rw.rewrite(prog, "sparse:neighborhood=3")


def test_patch_grid_of_a_video_embedding():
    from rewriter.passes.neighborhood import patch_grids

    class Tubelets(torch.nn.Module):  # VideoMAE-style: frames 2 x 8x8 patches
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4))
            self.mix = torch.nn.Conv2d(3, 3, 3, padding=1)  # stride 1: not a patch embedding

        def forward(self, x):
            return self.proj(x).flatten(2).sum()

    gm = torch.export.export(Tubelets(), (torch.randn(1, 3, 4, 32, 32),)).module()
    assert patch_grids(gm) == [(2, 8, 8)]
    assert math.prod(patch_grids(gm)[0]) == 128


def test_cli_variants_lists_neighborhood():
    from typer.testing import CliRunner

    from rewriter.cli.app import app

    result = CliRunner().invoke(app, ["variants"])
    assert result.exit_code == 0, result.output
    assert "sparse:neighborhood=K" in result.stdout
