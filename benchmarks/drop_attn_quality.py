"""What dropping attention layers costs: SmolLM2 perplexity with 10/20/30 % of its attention
sublayers removed, chosen by each score, at random, and healed.

    .venv/bin/python benchmarks/drop_attn_quality.py [--ratios 0.1 0.2 0.3]
        [--scores cosine gradient] [--random 3] [--heal heal:steps=64] [--ctx 512]
        [--windows 8] [--out benchmarks/results/drop_attn_quality.json]

Perplexity on held-out pydoc windows (evaluation starts 40k tokens into the text; scores and
healing read only the tokens before that). Random rows drop the same number of layers, drawn
with seeds 0..N-1 (mean, min and max over the draws). The heal spec is appended to the first
score's rewrite. The JSON is rewritten after every row; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import rewriter as rw
from rewriter.analysis.quality import eval_windows, logits_fn, perplexity
from rewriter.io.atomic import atomic_file
from rewriter.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--scores", nargs="+", default=["cosine", "gradient"])
    parser.add_argument("--random", type=int, default=3, help="random draws per ratio")
    parser.add_argument("--heal", default="heal:steps=64")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/drop_attn_quality.json")
    opts = parser.parse_args()
    torch.manual_seed(0)
    out = Path(opts.out)
    loaded = load("smollm2-135m")
    program = loaded.capture(seq_len=16)
    windows = eval_windows(loaded.tokenizer, opts.ctx, opts.windows)
    dense = perplexity(logits_fn(program), windows)
    layers = sorted(s.layer for s in program.sites)
    rows: list[dict] = []
    result = {"model": "smollm2-135m", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "ctx": opts.ctx, "windows": opts.windows,
              "dense_ppl": dense, "attention_layers": len(layers), "heal": opts.heal,
              "rows": rows}

    def save() -> None:
        atomic_file(out, json.dumps(result, indent=2, default=str) + "\n")

    def row(ratio: float, how: str, spec: list[str], extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        new = rw.rewrite(program, spec)
        seconds = time.perf_counter() - t0
        ppl = perplexity(logits_fn(new), windows)
        drop = next(p for p in new.manifest["passes"] if p["spec"].startswith("drop-attn"))
        entry = {"ratio": ratio, "how": how, "spec": spec, "dropped_layers":
                 drop["dropped_layers"], "ppl": ppl, "x_dense": ppl / dense,
                 "parameters": new.parameter_count(),
                 "kv_cache_bytes_per_token": drop["kv_cache_bytes_per_token"][1],
                 "seconds": round(seconds, 1), **(extra or {})}
        rows.append(entry)
        save()
        print(f"{ratio:.0%} {how}: ppl {ppl:.3f} ({ppl / dense:.3f}x dense), layers "
              f"{drop['dropped_layers']} [{seconds:.0f} s]", flush=True)
        return entry

    print(f"dense ppl {dense:.3f}", flush=True)
    for ratio in opts.ratios:
        count = math.floor(ratio * len(layers) + 0.5)
        for score in opts.scores:
            row(ratio, score, [f"drop-attn:ratio={ratio},score={score}"])
        if opts.heal:
            row(ratio, f"{opts.scores[0]} + {opts.heal}",
                [f"drop-attn:ratio={ratio},score={opts.scores[0]}", opts.heal])
        draws = []
        for seed in range(opts.random):
            picked = sorted(random.Random(seed).sample(layers, count))
            draws.append(row(ratio, f"random (seed {seed})",
                             [f"drop-attn:layers={';'.join(map(str, picked))}"]))
        if draws:
            ppls = [d["ppl"] for d in draws]
            result.setdefault("random_summary", {})[str(ratio)] = {
                "mean_x_dense": sum(ppls) / len(ppls) / dense,
                "min_x_dense": min(ppls) / dense, "max_x_dense": max(ppls) / dense}
            save()
    print("\n| dropped | chosen by | layers | ppl | x dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']:.0%} ({len(r['dropped_layers'])}) | {r['how']} | "
              f"{','.join(map(str, r['dropped_layers']))} | {r['ppl']:.2f} | "
              f"{r['x_dense']:.2f} |")


if __name__ == "__main__":
    main()
