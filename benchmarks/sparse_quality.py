"""Quality of the compute variants on SmolLM2 at a long context: perplexity on held-out
pydoc windows for dense, sink+window masks, calibrated per-head masks and cross-layer sharing.

    .venv/bin/python benchmarks/sparse_quality.py [--ctx 1024] [--windows 8]
        [--out benchmarks/results/sparse_quality.json]

Calibration reads the first tokens of the text; evaluation windows start 40k tokens in.
Writes JSON and prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rewriter as rw
from rewriter.analysis.quality import eval_windows, logits_fn, perplexity
from rewriter.api import calibration_batches
from rewriter.io.atomic import atomic_file
from rewriter.models import load

VARIANTS = [
    "sparse:window=64,sink=4",
    "sparse:window=128,sink=4",
    "sparse:window=256,sink=4",
    "sparse:window=128",
    "sparse:heads=auto,density=0.25",
    "share-kv:group=2",
    "share-kv:group=2,layers=auto",
    "share-attn:group=2",
    "share-attn:group=2,layers=auto",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--out", default="benchmarks/results/sparse_quality.json")
    opts = parser.parse_args()

    loaded = load(opts.model)
    program = loaded.capture(seq_len=16)
    windows = eval_windows(loaded.tokenizer, opts.ctx, opts.windows)
    calibration = calibration_batches(program, None, seq_len=opts.ctx, batches=4)

    rows = []
    t0 = time.perf_counter()
    dense = perplexity(logits_fn(program), windows)
    rows.append({"variant": "dense", "ppl": dense, "ratio": 1.0,
                 "seconds": time.perf_counter() - t0})
    print(f"dense: {dense:.3f}", flush=True)
    for spec in opts.variants:
        t0 = time.perf_counter()
        variant = rw.rewrite(program, spec, calibration=calibration)
        ppl = perplexity(logits_fn(variant), windows)
        info = variant.manifest["passes"][-1]
        row = {"variant": spec, "ppl": ppl, "ratio": ppl / dense,
               "seconds": time.perf_counter() - t0,
               "parameters": variant.parameter_count(),
               "kv_cache_bytes_per_token": kv_bytes(variant),
               "pass": info}
        rows.append(row)
        print(f"{spec}: {ppl:.3f} ({ppl / dense:.3f}x)", flush=True)

    result = {"model": loaded.name, "ctx": opts.ctx, "windows": opts.windows,
              "dense_parameters": program.parameter_count(),
              "dense_kv_cache_bytes_per_token": kv_bytes(program),
              "torch": torch.__version__, "rows": rows}
    out = Path(opts.out)
    atomic_file(out, json.dumps(result, indent=2) + "\n")
    print("\n| variant | perplexity | x dense | detail |\n|---|---|---|---|")
    for r in rows:
        p = r.get("pass", {})
        detail = ", ".join(f"{k}={v}" for k, v in p.items()
                           if k in ("density_at_ctx", "full_heads", "runs"))
        print(f"| {r['variant']} | {r['ppl']:.3f} | {r['ratio']:.3f} | {detail} |")


def kv_bytes(program) -> int:
    """bf16 KV-cache bytes per token over sites that own their K/V."""
    return sum(s.kv_cache_bytes_per_token() for s in program.sites if s.kv_source is None)


if __name__ == "__main__":
    main()
