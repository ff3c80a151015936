"""Generated Triton attention kernels vs SDPA and FlexAttention, on a CUDA GPU.

    .venv/bin/python benchmarks/kernels.py [--seq-lens 4096,8192,16384,32768]
        [--head-dims 64,128] [--heads 32] [--kv-heads 8] [--out benchmarks/results/kernels.json]

bf16, batch 1, GQA Hq/Hkv. Cases:
  dense-causal   triton vs SDPA (flash backend)
  sink-window    causal, window=1024,sink=4        triton vs FlexAttention (compiled, with the
  dilated        causal, window=2048,dilation=2    equivalent BlockMask) and vs SDPA with a
  per-head       causal, half the heads full, the  dense boolean mask
                 other half window=512,sink=4
Reports per (case, S, D) and implementation: median ms, TFLOP/s over the kept score entries
(4 * Hq * D * kept pairs; dense-equivalent too), max |error| against SDPA's (or Flex's)
output, and one-off costs separately: Triton JIT compile, Flex compile, BlockMask creation.
A run that does not fit in memory is recorded as such. Needs CUDA; exits with a message
otherwise. Writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from rewriter.ir.masks import MaskSpec

CASES = {  # name -> sparsity (every case is causal); "{heads}" is filled per head count
    "dense-causal": "",
    "sink-window": "window=1024,sink=4",
    "dilated": "window=2048,dilation=2",
    "per-head": "window=512,sink=4,heads={heads}",
}
MASK_BYTES_LIMIT = 8 << 30  # dense boolean masks larger than this are not materialized


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=ints, default=[4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=ints, default=[64, 128])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    return parser.parse_args(argv)


def sparsity_of(case: str, heads: int) -> str:
    """The MaskSpec string of a case for ``heads`` query heads (per-head: first half full)."""
    return CASES[case].format(heads="f" * (heads // 2) + "s" * (heads - heads // 2))


def plan(opts: argparse.Namespace) -> list[dict]:
    """Every (case, S, D) to run, with its sparsity string (CPU-only, no tensors)."""
    out = []
    for case in opts.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r} (choose from {', '.join(CASES)})")
        for d in opts.head_dims:
            for s in opts.seq_lens:
                out.append({"case": case, "seq_len": s, "head_dim": d,
                            "sparsity": sparsity_of(case, opts.heads)})
    return out


def kept_pairs(sparsity: str, s: int, heads: int, device) -> int:
    """Score entries kept by causal AND the sparsity, summed over heads (chunked over rows)."""
    spec = MaskSpec.parse(sparsity)
    windows = spec.head_windows(heads).to(device) if spec.heads else None
    h = torch.arange(heads, device=device).view(heads, 1, 1)
    k = torch.arange(s, device=device).view(1, 1, s)
    total = 0
    for start in range(0, s, 1024):
        q = torch.arange(start, min(start + 1024, s), device=device).view(1, -1, 1)
        keep = spec.mask_mod(None, h, q, k, windows=windows) & (k <= q)
        total += int(keep.expand(heads, -1, -1).sum())
    return total


def mask_mod_of(sparsity: str, heads: int, device):
    """FlexAttention mask_mod: causal AND the MaskSpec (Sq == Sk, so no offset)."""
    spec = MaskSpec.parse(sparsity)
    windows = spec.head_windows(heads).to(device) if spec.heads else None

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.mask_mod(b, h, q_idx, kv_idx, windows=windows) & (kv_idx <= q_idx)

    return mask_mod


def timed(fn) -> tuple[float, float]:
    """(first call seconds, i.e. compile + one run; steady-state median ms)."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    return first, do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_one(item: dict, opts: argparse.Namespace) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from rewriter.codegen.triton import triton_attention

    dev, s, d, hq, hkv = "cuda", item["seq_len"], item["head_dim"], opts.heads, opts.kv_heads
    sparsity, scale = item["sparsity"], d ** -0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, hq, s, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k_rep, v_rep = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))  # for SDPA
    pairs = kept_pairs(sparsity, s, hq, dev) if sparsity else hq * s * (s + 1) // 2
    flops = 4 * d * pairs
    dense_flops = 4 * d * hq * s * (s + 1) // 2
    result = {**item, "heads": hq, "kv_heads": hkv, "dtype": "bf16",
              "density": pairs / (hq * s * (s + 1) / 2), "impls": {}}

    def record(name, fn, reference=None, **extra):
        try:
            first, ms = timed(fn)
            out = fn()
            entry = {"ms": ms, "tflops": flops / ms / 1e9,
                     "dense_equivalent_tflops": dense_flops / ms / 1e9,
                     "first_call_s": first, **extra}
            if reference is not None:
                entry["max_abs_err"] = float((out.float() - reference.float()).abs().max())
            result["impls"][name] = entry
            return out
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            result["impls"][name] = {"error": "out of memory"}
            return None

    attrs = {"scale": scale, "is_causal": True, "sparsity": sparsity}
    if not sparsity:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = record("sdpa-flash", lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k_rep, v_rep, is_causal=True, scale=scale))
        record("triton", lambda: triton_attention(q, k, v, **attrs), ref)
        return result

    spec = MaskSpec.parse(sparsity)
    mask_heads = hq if spec.heads else 1  # a mask without a per-head table broadcasts
    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod_of(sparsity, hq, dev), 1, mask_heads, s, s,
                                   device=dev)
    torch.cuda.synchronize()
    block_mask_s = time.perf_counter() - start
    flex = torch.compile(flex_attention)
    ref = record("flex", lambda: flex(q, k, v, block_mask=block_mask, scale=scale,
                                      enable_gqa=True),
                 block_mask_s=block_mask_s, note="first_call_s includes torch.compile")
    record("triton", lambda: triton_attention(q, k, v, **attrs), ref,
           note="first_call_s includes kernel generation and Triton JIT")
    if mask_heads * s * s > MASK_BYTES_LIMIT:
        result["impls"]["sdpa-mask"] = {"error": f"dense mask of {mask_heads * s * s / 2**30:.0f}"
                                                 " GiB not materialized"}
    else:
        dense = spec.dense(s, s, mask_heads, device=dev) & torch.ones(
            s, s, dtype=torch.bool, device=dev).tril()
        record("sdpa-mask", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k_rep, v_rep, attn_mask=dense.unsqueeze(0), scale=scale), ref)
        del dense
    return result


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    items = plan(opts)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (none found); the generated kernels "
                 "are tested on CPU by tests/codegen (TRITON_INTERPRET=1)")
    results = []
    for item in items:
        print(f"{item['case']} S={item['seq_len']} D={item['head_dim']}", file=sys.stderr)
        results.append(run_one(item, opts))
        torch.cuda.empty_cache()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "python": platform.python_version(),
           "results": results}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
