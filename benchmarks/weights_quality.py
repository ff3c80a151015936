"""Quality of the weight variants: GQA/MQA conversion and head pruning.

    .venv/bin/python benchmarks/weights_quality.py [--ctx 512] [--windows 8]
        [--out benchmarks/results/weights_quality.json]

SmolLM2: perplexity on held-out pydoc windows (calibration reads the first tokens of the text,
evaluation starts 40k tokens in) for dense, gqa:kv-heads=1 with merge=mean and merge=fit, and
prune-heads:ratio=0.22 with each score. MiniLM: cosine similarity of mean-pooled sentence
embeddings to the dense model for 12 -> 4 and 12 -> 1 KV heads and 25% head pruning.
Writes JSON and prints Markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rewriter as rw
from rewriter.analysis.quality import (
    eval_windows,
    logits_fn,
    perplexity,
    sentence_embeddings,
)
from rewriter.api import calibration_batches
from rewriter.io.atomic import atomic_file
from rewriter.models import load

SMOLLM_VARIANTS = [
    "gqa:kv-heads=1,merge=mean",
    "gqa:kv-heads=1,merge=fit",
    "prune-heads:ratio=0.22,score=magnitude",
    "prune-heads:ratio=0.22,score=activation",
    "prune-heads:ratio=0.22,score=gradient",
]
MINILM_VARIANTS = [
    "gqa:kv-heads=4,merge=mean",
    "gqa:kv-heads=4,merge=fit",
    "gqa:kv-heads=1,merge=mean",
    "gqa:kv-heads=1,merge=fit",
    "prune-heads:ratio=0.25,score=magnitude",
    "prune-heads:ratio=0.25,score=activation",
]


def smollm(opts) -> dict:
    loaded = load("smollm2-135m")
    program = loaded.capture(seq_len=16)
    windows = eval_windows(loaded.tokenizer, opts.ctx, opts.windows)
    calibration = calibration_batches(program, None, seq_len=opts.ctx, batches=4)
    dense = perplexity(logits_fn(program), windows)
    rows = [{"variant": "dense", "ppl": dense, "ratio": 1.0,
             "parameters": program.parameter_count(),
             "kv_cache_bytes_per_token": program.accounting()["kv_cache_bytes_per_token"]}]
    print(f"smollm2 dense: {dense:.3f}", flush=True)
    for spec in opts.smollm or SMOLLM_VARIANTS:
        t0 = time.perf_counter()
        variant = rw.rewrite(program, spec, calibration=calibration)
        ppl = perplexity(logits_fn(variant), windows)
        rows.append({"variant": spec, "ppl": ppl, "ratio": ppl / dense,
                     "seconds": time.perf_counter() - t0,
                     "parameters": variant.parameter_count(),
                     "kv_cache_bytes_per_token":
                         variant.accounting()["kv_cache_bytes_per_token"],
                     "pass": variant.manifest["passes"][-1]})
        print(f"smollm2 {spec}: {ppl:.3f} ({ppl / dense:.2f}x)", flush=True)
    return {"model": "smollm2-135m", "ctx": opts.ctx, "windows": opts.windows, "rows": rows}


def minilm(opts) -> dict:
    loaded = load("minilm-l6")
    program = loaded.capture(seq_len=16)
    sentences = eval_windows(loaded.tokenizer, 64, 32)  # held-out 64-token passages
    calibration = calibration_batches(program, None, seq_len=128, batches=4)

    def embed(prog):
        return sentence_embeddings(prog, sentences)

    dense = embed(program)
    rows = [{"variant": "dense", "cosine_mean": 1.0, "cosine_min": 1.0,
             "parameters": program.parameter_count()}]
    for spec in opts.minilm or MINILM_VARIANTS:
        variant = rw.rewrite(program, spec, calibration=calibration)
        cos = torch.nn.functional.cosine_similarity(embed(variant), dense, dim=-1)
        rows.append({"variant": spec, "cosine_mean": float(cos.mean()),
                     "cosine_min": float(cos.min()), "parameters": variant.parameter_count(),
                     "pass": variant.manifest["passes"][-1]})
        print(f"minilm {spec}: cosine {float(cos.mean()):.4f} (min {float(cos.min()):.4f})",
              flush=True)
    return {"model": "minilm-l6", "sentences": int(sentences.shape[0]), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--smollm", nargs="*", default=None)
    parser.add_argument("--minilm", nargs="*", default=None)
    parser.add_argument("--skip", choices=["smollm", "minilm"], action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/weights_quality.json")
    opts = parser.parse_args()
    result = {"torch": torch.__version__}
    if "minilm" not in opts.skip:
        result["minilm"] = minilm(opts)
    if "smollm" not in opts.skip:
        result["smollm2"] = smollm(opts)
    out = Path(opts.out)
    atomic_file(out, json.dumps(result, indent=2, default=str) + "\n")
    if "smollm2" in result:
        print("\n| SmolLM2 variant | perplexity | x dense | params | KV B/token |")
        print("|---|---|---|---|---|")
        for r in result["smollm2"]["rows"]:
            print(f"| {r['variant']} | {r['ppl']:.3f} | {r['ratio']:.2f} | {r['parameters']:,} | "
                  f"{r['kv_cache_bytes_per_token']} |")
    if "minilm" in result:
        print("\n| MiniLM variant | cosine mean | cosine min | params |\n|---|---|---|---|")
        for r in result["minilm"]["rows"]:
            print(f"| {r['variant']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                  f"{r['parameters']:,} |")


if __name__ == "__main__":
    main()
