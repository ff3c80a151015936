"""Speed of ``sparse:neighborhood=K`` on a ViT, eager on the CPU: dense vs neighbourhood masks
at several token grids.

    .venv/bin/python benchmarks/neighborhood_speed.py [--images 224,448,896] [--kernels 7,13]
        [--layers 2] [--threads 2] [--repeats 9] [--out benchmarks/results/neighborhood_speed.json]

A transformers ViTModel with ViT-Base's shapes (hidden 768, 12 heads, MLP 3072, patch 16) and
random weights, ``--layers`` layers, batch 1, fp32; image 224/448/896 gives 14x14/28x28/56x56
patches plus CLS. Per grid: capture once, rewrite with each kernel size, then time one forward
of each program per repeat, the candidates interleaved within a repeat (so drift hits all
alike); medians. Also the attention op alone on one layer's q/k/v, including the mask folded
into one SDPA call (the eager path before the block-sparse one) for comparison. Writes JSON;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import rewriter as rw
from rewriter.io.atomic import atomic_file
from rewriter.ir import blocksparse
from rewriter.ir.masks import MaskSpec

PATCH = 16
VIT_BASE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                patch_size=PATCH, num_channels=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=ints, default=[224, 448, 896])
    parser.add_argument("--kernels", type=ints, default=[7, 13])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/neighborhood_speed.json")
    return parser.parse_args(argv)


def build(image: int, layers: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=image, num_hidden_layers=layers,
                                    attn_implementation="sdpa", **VIT_BASE)
    return transformers.ViTModel(config).eval()


def medians(candidates: dict, repeats: int) -> dict[str, float]:
    """name -> median ms of fn(), one call of each candidate per repeat, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up: plans, allocator
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def folded(fn):
    """fn with the block-sparse path switched off: the mask folded into one SDPA call."""
    def run():
        saved = blocksparse.MIN_PAIRS
        blocksparse.MIN_PAIRS = 1 << 62
        try:
            return fn()
        finally:
            blocksparse.MIN_PAIRS = saved
    return run


def bench_grid(image: int, opts: argparse.Namespace) -> list[dict]:
    grid = image // PATCH
    pixels = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    prog = rw.capture(build(image, opts.layers), (), {"pixel_values": pixels})
    programs = {"dense": prog}
    for k in opts.kernels:
        programs[f"sparse:neighborhood={k}"] = rw.rewrite(prog, f"sparse:neighborhood={k}")

    def forward(p):
        def run():
            with torch.no_grad():
                return p.module(pixel_values=pixels)
        return run

    model_ms = medians({name: forward(p) for name, p in programs.items()}, opts.repeats)

    # The op alone, on one layer's shapes: [1, 12, tokens, 64].
    tokens = grid * grid + 1
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, tokens, 64, generator=g) for _ in range(3))
    op = torch.ops.rewriter.attention
    calls = {"dense": lambda: op(q, k, v, scale=0.125)}
    for name, p in list(programs.items())[1:]:
        sparsity = p.sites[0].sparsity
        calls[name] = (lambda s: lambda: op(q, k, v, scale=0.125, sparsity=s))(sparsity)
        calls[name + " (folded)"] = folded(calls[name])
    op_ms = medians(calls, opts.repeats)

    rows = []
    for name, p in programs.items():
        sparsity = p.sites[0].sparsity
        mask = MaskSpec.parse(sparsity)
        row = {"image": image, "grid": f"{grid}x{grid}", "tokens": tokens, "variant": name,
               "sparsity": sparsity,
               "density": 1.0 if not sparsity else mask.density(tokens, tokens),
               "block_sparse": bool(sparsity) and blocksparse.worthwhile(
                   sparsity, tokens, tokens, 12, False),
               "forward_ms": model_ms[name], "forward_ratio": model_ms[name] / model_ms["dense"],
               "attention_ms": op_ms[name],
               "attention_ratio": op_ms[name] / op_ms["dense"]}
        if sparsity:
            row["attention_folded_ms"] = op_ms[name + " (folded)"]
        rows.append(row)
        print(f"{image}px {grid}x{grid}: {name}: density {row['density']:.3f}, forward "
              f"{row['forward_ms']:.1f} ms ({row['forward_ratio']:.2f}x), attention "
              f"{row['attention_ms']:.2f} ms ({row['attention_ratio']:.2f}x)"
              + (f", folded {row['attention_folded_ms']:.2f} ms" if sparsity else ""),
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    rows = [row for image in opts.images for row in bench_grid(image, opts)]
    result = {"model": f"ViTModel, random init, ViT-Base shapes, {opts.layers} layers",
              "batch": 1, "dtype": "fp32", "threads": opts.threads, "repeats": opts.repeats,
              "rule": {"min_pairs": blocksparse.MIN_PAIRS,
                       "max_gathered": blocksparse.MAX_GATHERED, "block": blocksparse.BLOCK},
              "torch": torch.__version__, "machine": platform.machine(),
              "seconds": time.perf_counter() - start, "rows": rows}
    atomic_file(Path(opts.out), json.dumps(result, indent=2) + "\n")
    print("\n| grid | variant | density | dense ms | ms | x dense | attention x dense |")
    print("|---|---|---|---|---|---|---|")
    dense = {r["grid"]: r["forward_ms"] for r in rows if r["variant"] == "dense"}
    for r in rows:
        print(f"| {r['grid']} | {r['variant']} | {r['density']:.3f} | {dense[r['grid']]:.1f} | "
              f"{r['forward_ms']:.1f} | {r['forward_ratio']:.2f} | {r['attention_ratio']:.2f} |")


if __name__ == "__main__":
    main()
