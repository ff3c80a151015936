"""Dynamic top-k block sparsity against calibrated static per-head masks at the same density:
SmolLM2 perplexity and prefill speed at 1k-4k tokens.

    .venv/bin/python benchmarks/topk_quality_speed.py [--ctx 1024 2048 4096] [--windows 4]
        [--density 0.25] [--block 64] [--reps 3] [--threads 2] [--onnx]
        [--out benchmarks/results/topk_quality_speed.json]

Per context N: `sparse:heads=auto,density=P,ctx=N` (calibrated on 4 windows of N tokens from
the start of the text) and `sparse:topk=K,block=B` with the smallest K whose kept fraction of
the causal score matrix at N is >= P (measured on the mask itself), with both estimates
(`mean`, `channels:16`). Perplexity on held-out windows (40k tokens into the text); prefill
time of one window (batch 1, eager backend, `--threads` threads), candidates interleaved,
medians of `--reps`. With `--onnx`, the same prefill in ONNX Runtime (`target="ort"`; top-k's
selection is built in-graph and reaches GroupQueryAttention as a dense bias). Writes JSON after
every context; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rewriter as rw
from rewriter.analysis.quality import eval_windows, logits_fn, perplexity
from rewriter.api import calibration_batches
from rewriter.io.atomic import atomic_file
from rewriter.ir.topk import TopKSpec
from rewriter.models import load


def topk_for_density(density: float, ctx: int, block: int, estimate: str) -> tuple[str, float]:
    """The smallest K whose mask keeps >= ``density`` of the causal scores at ``ctx``."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, ctx, 64, generator=g), torch.randn(1, 1, ctx, 64, generator=g)
    for count in range(1, ctx // block + 1):
        spec = TopKSpec(count, block, 4, block, estimate)
        kept = spec.density(q, k)
        if kept >= density:
            return f"sparse:topk={count},block={block},estimate={estimate}", kept
    return f"sparse:topk={ctx // block},block={block},estimate={estimate}", 1.0


def prefill_seconds(programs: dict, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of one forward per program, runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in programs}
    with torch.no_grad():
        for prog in programs.values():  # warm-up
            logits_fn(prog)(ids)
        for _ in range(reps):
            for name, prog in programs.items():
                t0 = time.perf_counter()
                logits_fn(prog)(ids)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def onnx_prefill_seconds(programs: dict, ids: torch.Tensor, reps: int, threads: int
                         ) -> dict[str, float]:
    """Median seconds of one ONNX Runtime prefill per program (exported with target="ort"),
    runs interleaved."""
    from rewriter import onnx as rwonnx

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, prog) in enumerate(programs.items()):
            path = Path(tmp) / f"m{i}.onnx"
            prog.export_onnx(path, "ort")
            sessions[name] = rwonnx.session(path, threads=threads)
        args, kwargs = next(iter(programs.values())).call_with_tokens(ids)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():
            rwonnx.run(sess, *args, **kwargs)  # warm-up
        for _ in range(reps):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                rwonnx.run(sess, *args, **kwargs)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime prefill")
    parser.add_argument("--out", default="benchmarks/results/topk_quality_speed.json")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    loaded = load("smollm2-135m")
    program = loaded.capture(seq_len=16)
    result = {"model": "smollm2-135m", "torch": torch.__version__, "threads": opts.threads,
              "density": opts.density, "block": opts.block, "contexts": []}
    for ctx in opts.ctx:
        windows = eval_windows(loaded.tokenizer, ctx, opts.windows)
        calibration = calibration_batches(program, None, seq_len=ctx, batches=4)
        auto_spec = f"sparse:heads=auto,density={opts.density},ctx={ctx}"
        auto = rw.rewrite(program, auto_spec, calibration=calibration)
        candidates = {"dense": (program, 1.0), auto_spec: (
            auto, auto.manifest["passes"][-1]["density_at_ctx"])}
        for estimate in ("mean", "channels:16"):
            spec, kept = topk_for_density(opts.density, ctx, opts.block, estimate)
            candidates[spec] = (rw.rewrite(program, spec), kept)
        rows = []
        dense_ppl = None
        for name, (prog, kept) in candidates.items():
            ppl = perplexity(logits_fn(prog), windows)
            dense_ppl = dense_ppl or ppl
            rows.append({"variant": name, "density": round(kept, 4), "ppl": ppl,
                         "x_dense_ppl": ppl / dense_ppl})
            print(f"ctx {ctx} {name}: density {kept:.3f} ppl {ppl:.3f} "
                  f"({ppl / dense_ppl:.3f}x)", flush=True)
        seconds = prefill_seconds({n: p for n, (p, _) in candidates.items()},
                                  windows[:1], opts.reps)
        for row in rows:
            row["prefill_s"] = round(seconds[row["variant"]], 4)
            row["tokens_per_s"] = round(ctx / seconds[row["variant"]], 1)
            row["speedup_vs_dense"] = round(seconds["dense"] / seconds[row["variant"]], 3)
        if opts.onnx:
            ort = onnx_prefill_seconds({n: p for n, (p, _) in candidates.items()},
                                       windows[:1], opts.reps, opts.threads)
            for row in rows:
                row["ort_prefill_s"] = round(ort[row["variant"]], 4)
                row["ort_speedup_vs_dense"] = round(ort["dense"] / ort[row["variant"]], 3)
        result["contexts"].append({"ctx": ctx, "windows": int(windows.shape[0]), "rows": rows})
        atomic_file(out, json.dumps(result, indent=2) + "\n")
    print("\n| ctx | variant | density | ppl | x dense | prefill s | speed vs dense | ORT |")
    print("|---|---|---|---|---|---|---|---|")
    for c in result["contexts"]:
        for r in c["rows"]:
            ort = f"{r['ort_speedup_vs_dense']:.2f}x" if "ort_speedup_vs_dense" in r else "-"
            print(f"| {c['ctx']} | {r['variant']} | {r['density']:.3f} | {r['ppl']:.2f} | "
                  f"{r['x_dense_ppl']:.3f} | {r['prefill_s']:.2f} | "
                  f"{r['speedup_vs_dense']:.2f}x | {ort} |")


if __name__ == "__main__":
    main()
