"""Generated Triton kernels (run by the interpreter on CPU) against the naive reference, the
kernel cache, and a whole model compiled with the triton backend against eager.

Shapes are tiny (the interpreter runs every program instance in numpy); tiles of 16 keys make
lengths of 33-40 span several KV tiles, so sink, band, full and trailing-tile loops all run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import rewriter as rw
from rewriter.codegen.triton import BACKEND, KernelSpec, launch, triton_attention
from rewriter.codegen.triton import cache as kernel_cache
from rewriter.errors import RewriterError, SpecError
from rewriter.ir.masks import EMPTY, MaskSpec
from rewriter.ir.ops import reference_attention

TOL = 1e-4  # fp32


def _qkv(b, hq, hkv, sq, sk, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, dv or d, generator=g).to(dtype)
    return q, k, v


def _check(q, k, v, mask=None, *, tol=TOL, block_m=None, block_n=16, **attrs):
    attrs = {"scale": q.shape[-1] ** -0.5, **attrs}
    got = triton_attention(q, k, v, mask, block_m=block_m, block_n=block_n, **attrs)
    want = reference_attention(q.float(), k.float(), v.float(), mask, **attrs)
    assert got.shape == want.shape and got.dtype == q.dtype
    err = (got.float() - want).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e}"
    return got


# --- head dims, GQA ratios, lengths --------------------------------------------------------


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_dense_causal_head_dims_and_gqa(d, group):
    _check(*_qkv(1, 2 * group if group < 4 else 4, 2 if group < 4 else 1, 33, 33, d),
           is_causal=True)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 33), (7, 7), (7, 40), (33, 7), (33, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths_cross_and_decode(sq, sk, causal):
    _check(*_qkv(2, 2, 1, sq, sk, 32), is_causal=causal)


def test_packed_heads_not_a_power_of_two():
    # G = 3 (SmolLM2's 9/3): 16-row tiles hold 5 queries x 3 heads, one row idle.
    _check(*_qkv(1, 6, 2, 17, 23, 32), block_m=16, is_causal=True, sparsity="window=6")


def test_head_dim_padding_and_v_head_dim():
    _check(*_qkv(1, 2, 1, 9, 20, 8, dv=24), is_causal=True)  # D=8 < 16, Dv not a power of 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton 3.9 interpreter's tl.dot returns garbage for bf16 operands; "
                    "fp16 runs the same code (bf16 is checked by benchmarks/kernels.py on GPU)")
    _check(*_qkv(1, 4, 2, 17, 33, 64, dtype=dtype), tol=3e-2, sparsity="window=8,sink=2")


# --- sparsity: window, sink, dilation, per-head tables --------------------------------------

SPARSITY = ["window=8", "window=8,sink=4", "window=6,dilation=2", "window=9,sink=3,dilation=3",
            "window=8,heads=f/4/s/8", "window=5,sink=17,heads=sfss"]


@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("causal", [False, True])
def test_sparsity(sparsity, causal):
    _check(*_qkv(1, 4, 2, 33, 40, 32), is_causal=causal, sparsity=sparsity)


@pytest.mark.parametrize("sparsity", ["window=8,sink=4", "window=4,dilation=3"])
def test_sparse_decode(sparsity):
    _check(*_qkv(2, 4, 1, 1, 37, 64), sparsity=sparsity)


@pytest.mark.parametrize("sparsity", ["window=8,sink=4", "window=8,heads=f/4/s/8", ""])
def test_unreachable_tiles_are_never_loaded(sparsity):
    """K/V tiles no query of the tile can reach are NaN: a kernel that loaded one would
    produce NaN. (One query tile, no GQA packing: the tile map is exactly what it may skip.)"""
    sq, sk, tile = 16, 128, 16
    q, k, v = _qkv(1, 4, 4, sq, sk, 32)
    want = reference_attention(q, k, v, scale=0.2, sparsity=sparsity)
    tiles = MaskSpec.parse(sparsity).tile_map(sq, sk, tile, tile, num_heads=4)[:, 0]
    # Query head h reads KV head h (G = 1): poison each head's unreachable tiles.
    for h, t in (tiles == EMPTY).nonzero().tolist():
        k[:, h, t * tile:(t + 1) * tile] = float("nan")
        v[:, h, t * tile:(t + 1) * tile] = float("nan")
    assert k.isnan().any() or not sparsity
    got = triton_attention(q, k, v, scale=0.2, sparsity=sparsity, block_m=16, block_n=tile)
    assert (got - want).abs().max() <= TOL


# --- attn_mask tensors, softcap, empty rows -------------------------------------------------


def test_float_mask_broadcast_over_heads():
    q, k, v = _qkv(2, 4, 2, 9, 12, 32)
    mask = torch.randn(2, 1, 9, 12)
    mask[0, :, 2] = float("-inf")  # an emptied row
    mask[1, :, :, :5] = torch.finfo(torch.float32).min  # HF padding: finite, not -inf
    _check(q, k, v, mask, is_causal=True)


def test_float_mask_fully_min_row_is_uniform_like_eager():
    q, k, v = _qkv(1, 2, 1, 5, 7, 32)
    mask = torch.zeros(5, 7)
    mask[1] = torch.finfo(torch.float32).min  # softmax of equal scores: uniform, not zeros
    got = _check(q, k, v, mask)
    assert got[0, :, 1].abs().sum() > 0


def test_bool_mask_broadcast_and_sparsity():
    q, k, v = _qkv(2, 4, 2, 9, 33, 32)
    mask = torch.rand(1, 4, 1, 33, generator=torch.Generator().manual_seed(3)) > 0.3
    _check(q, k, v, mask, sparsity="window=8,sink=2", is_causal=True)


def test_softcap():
    q, k, v = _qkv(1, 4, 2, 9, 17, 64)
    _check(q * 4, k, v, softcap=5.0, sparsity="window=6")


def test_rows_the_mask_empties_give_zeros():
    # Sq > Sk with a window: the first queries sit at negative positions, no key in reach.
    q, k, v = _qkv(1, 2, 1, 9, 4, 32)
    got = _check(q, k, v, sparsity="window=2")
    assert got[0, :, :4].abs().max() == 0


# --- the generator and its cache ------------------------------------------------------------


def _spec(**kw):
    base = {"head_dim": 64, "v_head_dim": 64, "group": 3, "dtype": torch.bfloat16,
            "causal": True, "softcap": 0.0, "mask": "none", "sparsity": "window=256,sink=4"}
    return KernelSpec.create(**{**base, **kw})


def test_kernel_named_by_meaning_and_keyed_by_specialization():
    spec = _spec()
    assert spec.name == "attn_fwd_d64_g3_win256_sink4_causal_bf16"
    assert spec.heads_per_tile == 3
    assert spec.key == _spec().key != _spec(causal=False).key
    assert _spec(sparsity="window=8,heads=f/4/s/8", mask="float").name == \
        "attn_fwd_d64_g3_headwin_causal_floatmask_bf16"


def test_emitted_source_is_readable_and_specialized():
    spec = _spec(sparsity="window=256,sink=4")
    path = kernel_cache.emit(spec)
    assert path.name == f"{spec.key}.py" and path.parent == kernel_cache.cache_dir()
    text = path.read_text()
    assert f"def {spec.name}(" in text
    assert "for start_n in range(0, sink_end, BLOCK_N):  # sink tiles" in text
    assert "MASKED=False" in text  # full tiles skip the mask arithmetic
    assert "dist % " not in text and "Mask" not in text  # no dilation, no attn_mask code
    assert not list(path.parent.glob("*.tmp"))
    compile(text, str(path), "exec")
    listed = {e["key"]: e for e in kernel_cache.list_kernels()}
    assert listed[spec.key]["name"] == spec.name and listed[spec.key]["sink"] == 4


def test_generator_refuses_with_a_reason():
    with pytest.raises(SpecError, match="head_dim 512"):
        _spec(head_dim=512)
    with pytest.raises(SpecError, match="dtype"):
        _spec(dtype=torch.float64)
    q, k, v = _qkv(1, 2, 1, 4, 4, 16)
    with pytest.raises(SpecError):
        triton_attention(q.double(), k.double(), v.double(), scale=1.0)


def test_tile_sizes_pack_heads_and_shrink_for_decode():
    spec = _spec()
    assert launch.tile_sizes(spec, 1, 4096)[:2] == (16, 64)
    assert launch.tile_sizes(spec, 4096, 4096)[:2] == (128, 64)


# --- dispatch: Program.compile("triton") ----------------------------------------------------


@pytest.fixture(scope="module")
def llama(zoo_captured):
    captured = zoo_captured("llama-eager")  # shared with other tests in this process
    return captured.prog, captured.entry


def test_compiled_model_matches_eager(llama, monkeypatch):
    prog, entry = llama
    calls = []
    real = launch.triton_attention
    monkeypatch.setattr(launch, "triton_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast = prog.compile("triton")
    assert [s.backend for s in fast.sites] == ["triton"] * len(prog.sites)
    assert [s.backend for s in prog.sites] == ["eager"] * len(prog.sites)  # input unchanged
    assert "triton" in fast.summary()
    assert all(r["inference_only"] for r in fast.manifest["compile"]["sites"].values())
    assert "compile" not in prog.manifest
    assert fast.verify(prog, tolerance=TOL).ok
    assert len(calls) == len(prog.sites)  # every site ran its kernel (no silent fallback)
    args, kwargs = entry.inputs(1, 13)  # another batch and length
    assert fast.verify(prog, args, kwargs, tolerance=TOL).ok


def test_compiled_sparse_model_matches_eager(llama):
    prog, _ = llama
    sparse = rw.rewrite(prog, ["sparse:window=3,sink=1"])
    fast = sparse.compile("triton")
    assert all(s.backend == "triton" for s in fast.sites)
    assert "win3_sink1" in fast.manifest["compile"]["sites"][0]["kernel"]
    assert fast.verify(sparse, tolerance=TOL).ok


def test_unsupported_site_falls_back_with_reason(llama):

    prog, _ = llama
    odd = prog.clone()
    odd.sites[0].dropout = 0.1
    fast = odd.compile("triton")
    assert [s.backend for s in fast.sites] == ["eager", "triton"]
    assert any("dropout" in n for n in fast.sites[0].notes)
    assert "dropout" in fast.manifest["compile"]["sites"][0]["reason"]
    assert fast.verify(prog, tolerance=TOL).ok


def test_backend_errors(llama, monkeypatch):
    prog, _ = llama
    with pytest.raises(SpecError, match="backend 'cuda'"):
        prog.compile("cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not BACKEND.available()[0]
    with pytest.raises(RewriterError, match="TRITON_INTERPRET"):
        prog.compile("triton")


def test_inference_only():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 4, 4, 16))
    out = torch.ops.rewriter.attention_triton(q, k, v, scale=0.25)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_cli_lists_cached_kernels():
    from typer.testing import CliRunner

    from rewriter.cli.app import app

    spec = _spec(sparsity="window=64")
    kernel_cache.emit(spec)
    result = CliRunner().invoke(app, ["inspect", "--kernels", "--json"])
    assert result.exit_code == 0, result.output
    keys = [k["key"] for k in json.loads(result.stdout)["kernels"]]
    assert spec.key in keys


def test_benchmark_plan_is_valid_without_a_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    module_spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    opts = bench.parse_args(["--seq-lens", "4096,32768", "--heads", "32"])
    items = bench.plan(opts)
    assert len(items) == len(bench.CASES) * 2 * 2
    for item in items:  # every case's mask spec parses and fits the head count
        MaskSpec.parse(item["sparsity"]).head_windows(32)
    assert bench.kept_pairs("window=4,sink=1", 16, 2, "cpu") == 2 * int(
        (MaskSpec.parse("window=4,sink=1").dense(16, 16)[0] & torch.ones(16, 16).bool().tril())
        .sum())
