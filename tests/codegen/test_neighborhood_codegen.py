"""Neighbourhood masks in the backends: the generated Triton kernel (interpreter) against the
naive reference, the tiles it visits, and ONNX export of a ViT rewritten with
``sparse:neighborhood=K`` against the program in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.codegen.triton import KernelSpec, triton_attention
from rewriter.codegen.triton import cache as kernel_cache
from rewriter.codegen.triton.template import neighborhood_band, visited_tiles
from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec
from rewriter.ir.ops import reference_attention

zoo = pytest.importorskip("zoo")

TOL = 1e-4  # fp32 kernels in the interpreter


def _qkv(b, hq, hkv, sq, sk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def _kernel_spec(sparsity: str, group: int = 1, causal: bool = False) -> KernelSpec:
    return KernelSpec.create(head_dim=16, v_head_dim=16, group=group, dtype=torch.float32,
                             causal=causal, softcap=0.0, mask="none", sparsity=sparsity)


# --- the kernel ------------------------------------------------------------------------------

KERNEL_CASES = [
    # sparsity, (B, Hq, Hkv, Sq), is_causal, model mask
    ("neighborhood=3,grid=6x6,global=1", (1, 2, 1, 37), False, None),
    ("neighborhood=5,grid=7x6", (2, 2, 2, 42), True, None),
    ("neighborhood=3,dilation=2,grid=7x5,global=2", (1, 4, 2, 20), False, "float"),
    ("neighborhood=3,dilation=2,grid=3x4x5,global=1", (1, 3, 1, 61), False, "bool"),
    ("neighborhood=1,grid=5x8", (1, 2, 1, 40), False, None),
]


@pytest.mark.parametrize("sparsity, shape, causal, mask", KERNEL_CASES,
                         ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_reference(sparsity, shape, causal, mask):
    b, hq, hkv, sq = shape
    sk = MaskSpec.parse(sparsity).tokens
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    g = torch.Generator().manual_seed(3)
    attn_mask = None if mask is None else (
        torch.randn(b, 1, sq, sk, generator=g) if mask == "float"
        else torch.rand(b, hq, 1, sk, generator=g) > 0.2)
    attrs = {"scale": 0.25, "is_causal": causal, "sparsity": sparsity}
    got = triton_attention(q, k, v, attn_mask, block_m=16, block_n=16, **attrs)
    want = reference_attention(q, k, v, attn_mask, **attrs)
    assert (got - want).abs().max() <= TOL


def test_kernel_refuses_a_wrong_token_count():
    q, k, v = _qkv(1, 2, 1, 30, 30)
    with pytest.raises(SpecError, match="37 tokens"):
        triton_attention(q, k, v, scale=0.25, sparsity="neighborhood=3,grid=6x6,global=1")


def test_tiles_outside_the_band_are_never_loaded():
    """One query tile (the last 16 tokens: grid rows 6-7 of 8x8, K=3): keys outside the CLS
    tile and the band of grid rows 5-7 are NaN; a kernel that loaded one would give NaN."""
    sparsity, tile = "neighborhood=3,grid=8x8,global=1", 16
    q, k, v = _qkv(1, 2, 2, 16, 65)
    lo, hi = neighborhood_band(_kernel_spec(sparsity), 64 - 16, 63)
    assert (lo, hi) == (1 + 5 * 8, 65)
    want = reference_attention(q, k, v, scale=0.25, sparsity=sparsity)
    visited = set(range(0, tile)) | set(range(lo // tile * tile, 65))
    outside = [j for j in range(65) if j not in visited]
    assert outside == list(range(16, 32))
    k[:, :, outside] = float("nan")
    v[:, :, outside] = float("nan")
    got = triton_attention(q, k, v, scale=0.25, sparsity=sparsity, block_m=16, block_n=tile)
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("sparsity", [
    "neighborhood=3,grid=8x8,global=1", "neighborhood=5,dilation=2,grid=9x7",
    "neighborhood=3,dilation=3,grid=10x4,global=2", "neighborhood=3,dilation=2,grid=5x3x4",
    "neighborhood=7,grid=5x5",
])
def test_band_holds_every_kept_key_and_is_tight(sparsity):
    """For every run of queries, every key a query keeps lies in the globals or the band; the
    band's first and last grid rows each hold a kept key (the band is the exact hull)."""
    mask = MaskSpec.parse(sparsity)
    spec, n = _kernel_spec(sparsity), mask.globals_
    keep = mask.dense(mask.tokens, mask.tokens)[0]
    cells = mask.tokens - n
    inner = cells // mask.grid[0]
    for first in range(cells):
        for last in range(first, min(first + 2 * inner + 3, cells)):
            lo, hi = neighborhood_band(spec, first, last)
            kept = keep[n + first:n + last + 1, n:].any(0).nonzero().flatten() + n
            assert int(kept.min()) >= lo and int(kept.max()) < hi
            assert (lo - n) // inner == (int(kept.min()) - n) // inner
            assert (hi - 1 - n) // inner == (int(kept.max()) - n) // inner


def test_visited_tiles_below_dense():
    """28x28 + CLS at K=7, 64 x 64 tiles: a query tile (2-3 grid rows) visits the CLS tile and
    the 8-9 grid rows its neighbourhoods reach, under half of the tiles."""
    sparsity = "neighborhood=7,grid=28x28,global=1"
    spec, n = _kernel_spec(sparsity), 785
    dense = (-(-n // 64)) ** 2
    visited = visited_tiles(spec, n, n, 64, 64)
    assert visited < 0.5 * dense
    wide = visited_tiles(_kernel_spec("neighborhood=13,grid=28x28,global=1"), n, n, 64, 64)
    assert visited < wide < dense


def test_kernel_source_names_the_neighborhood():
    spec = _kernel_spec("neighborhood=7,dilation=2,grid=14x14,global=1", group=3)
    assert spec.name == "attn_fwd_d16_g3_nbhd7_grid14x14_glob1_dil2_fp32"
    text = kernel_cache.emit(spec).read_text()
    assert "global key tiles" in text and "grid band" in text
    assert "x0 = first_g // 14" in text and "% 2" in text  # constants written in
    assert spec.key != _kernel_spec("neighborhood=7,dilation=2,grid=14x15,global=1", 3).key


# --- whole programs --------------------------------------------------------------------------

GRID = 6


@pytest.fixture(scope="module")
def vit_programs():
    entry = zoo.vit(GRID)
    args, kwargs = entry.inputs(2, 0)
    prog = rw.capture(entry.build(), args, kwargs)
    return {spec: rw.rewrite(prog, spec) for spec in
            ("sparse:neighborhood=3", "sparse:neighborhood=3,dilation=2")}, entry


def test_compiled_vit_matches_eager(vit_programs):
    programs, _ = vit_programs
    prog = programs["sparse:neighborhood=3,dilation=2"]
    fast = prog.compile("triton")
    assert all(s.backend == "triton" for s in fast.sites)
    assert "nbhd3_grid6x6_glob1_dil2" in fast.manifest["compile"]["sites"][0]["kernel"]
    assert fast.verify(prog, tolerance=TOL).ok


@pytest.mark.parametrize("spec", ["sparse:neighborhood=3", "sparse:neighborhood=3,dilation=2"])
@pytest.mark.parametrize("target, decompose", [("onnx", False), ("onnx", True), ("ort", False)])
def test_onnx_export_matches_program(vit_programs, tmp_path, spec, target, decompose):
    pytest.importorskip("onnxruntime")
    import onnx

    from rewriter import onnx as rwonnx
    from rewriter.analysis.verify import compare_outputs

    programs, entry = vit_programs
    prog = programs[spec]
    path = tmp_path / "vit.onnx"
    rows = rwonnx.export_onnx(prog, path, target, decompose=decompose)
    onnx.checker.check_model(str(path))
    assert len(rows) == len(prog.sites)
    model = onnx.load(str(path))
    # the neighbourhood mask is computed in-graph: no S x S constant (the export folds only
    # values of up to codegen.onnx.lean.FOLD_OUTPUT_LIMIT elements, here the S coordinates)
    tokens = GRID * GRID + 1
    constants = [list(t.dims) for t in model.graph.initializer] + \
        [list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
         for a in n.attribute if a.name == "value"]
    assert not [d for d in constants if d[-2:] == [tokens, tokens]]
    sess = rwonnx.session(path, threads=1)
    for batch in (2, 1):
        args, kwargs = entry.inputs(batch, 0)
        with torch.no_grad():
            want = [prog.module(*args, **kwargs).last_hidden_state]
        got = rwonnx.run(sess, *args, **kwargs)
        report = compare_outputs(got[:1], want, 1e-4)
        assert report.ok, f"{target} batch {batch}: {report}"
