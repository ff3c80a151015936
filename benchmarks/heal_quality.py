"""What `heal` buys: quality of each variant before and after healing, at one budget.

    .venv/bin/python benchmarks/heal_quality.py [--heal SPEC ...] [--ctx 512]
        [--windows 8] [--smollm SPEC ...] [--minilm SPEC ...] [--skip smollm|minilm]
        [--out benchmarks/results/heal_quality.json]

SmolLM2-135M: perplexity on held-out pydoc windows (evaluation starts 40k tokens into the text;
calibration and healing read only the tokens before that) for dense and each variant, without
and with each heal spec (default heal:minutes=5) appended. MiniLM-L6: cosine similarity of
mean-pooled sentence embeddings to the dense model on held-out passages. Records the heal
pass's manifest entry (budget, steps, tokens, loss before and after, seconds). The JSON is
rewritten after every row, so an interrupted run keeps what it measured. Asserts nothing.
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
from rewriter.io.atomic import atomic_file
from rewriter.models import load

SMOLLM_VARIANTS = [
    "gqa:kv-heads=1",
    "prune-heads:ratio=0.22,score=gradient",
    "sparse:heads=auto,density=0.25",
    "share-kv:group=2,layers=auto",
    "share-attn:group=2",
]
MINILM_VARIANTS = ["gqa:kv-heads=4"]
TARGETS = {  # perplexity ratio to dense after heal (issue #13)
    "gqa:kv-heads=1": 2.5,
    "prune-heads:ratio=0.22,score=gradient": 1.2,
    "sparse:heads=auto,density=0.25": 1.08,
    "share-kv:group=2,layers=auto": 2.0,
}


def _heal_summary(program) -> dict:
    entry = program.manifest["passes"][-1]
    heal = entry.get("heal", {})
    local, kd = heal.get("local", {}), heal.get("kd", {})
    blocks = local.get("blocks", [])
    return {
        "spec": entry["spec"], "seconds": heal.get("seconds"),
        "trained_parameters": heal.get("trained_parameters"),
        "local_steps": local.get("steps"), "local_seconds": local.get("seconds"),
        "local_error_before": sum(b["error_before"] for b in blocks),
        "local_error_after": sum(b.get("error_after", b["error_before"]) for b in blocks),
        "kd_steps": kd.get("steps"), "kd_tokens": kd.get("tokens"),
        "kd_loss_before": kd.get("loss_before"), "kd_loss_curve": kd.get("loss_curve"),
    }


def smollm(opts, result: dict, save) -> None:
    loaded = load("smollm2-135m")
    program = loaded.capture(seq_len=16)
    windows = eval_windows(loaded.tokenizer, opts.ctx, opts.windows)
    dense = perplexity(logits_fn(program), windows)
    rows = [{"variant": "dense", "ppl": dense, "ratio": 1.0}]
    result["smollm2"] = {"model": "smollm2-135m", "ctx": opts.ctx, "windows": opts.windows,
                         "heal": opts.heal, "rows": rows}
    print(f"smollm2 dense: {dense:.3f}", flush=True)
    for spec in opts.smollm or SMOLLM_VARIANTS:
        t0 = time.perf_counter()
        variant = rw.rewrite(program, spec)
        seconds = time.perf_counter() - t0
        before = perplexity(logits_fn(variant), windows)
        for heal in opts.heal:
            healed = rw.rewrite(variant, heal)
            after = perplexity(logits_fn(healed), windows)
            rows.append({"variant": spec, "ppl": before, "ratio": before / dense,
                         "heal_spec": heal, "healed_ppl": after, "healed_ratio": after / dense,
                         "target": TARGETS.get(spec), "rewrite_seconds": round(seconds, 1),
                         "heal": _heal_summary(healed)})
            save()
            print(f"smollm2 {spec}: {before / dense:.2f}x -> {heal} {after / dense:.2f}x "
                  f"({healed.manifest['passes'][-1]['heal']['seconds']} s)", flush=True)


def minilm(opts, result: dict, save) -> None:
    loaded = load("minilm-l6")
    program = loaded.capture(seq_len=16)
    sentences = eval_windows(loaded.tokenizer, 64, 32)  # held-out 64-token passages

    def embed(prog):
        return sentence_embeddings(prog, sentences)

    dense = embed(program)
    rows = []
    result["minilm"] = {"model": "minilm-l6", "sentences": int(sentences.shape[0]),
                        "heal": opts.heal, "rows": rows}
    for spec in opts.minilm or MINILM_VARIANTS:
        variant = rw.rewrite(program, spec)
        before = torch.nn.functional.cosine_similarity(embed(variant), dense, dim=-1)
        for heal in opts.heal:
            healed = rw.rewrite(variant, heal)
            after = torch.nn.functional.cosine_similarity(embed(healed), dense, dim=-1)
            rows.append({"variant": spec, "cosine_mean": float(before.mean()),
                         "cosine_min": float(before.min()), "heal_spec": heal,
                         "healed_cosine_mean": float(after.mean()),
                         "healed_cosine_min": float(after.min()), "target": 0.95,
                         "heal": _heal_summary(healed)})
            save()
            print(f"minilm {spec}: cosine {float(before.mean()):.4f} -> {heal} "
                  f"{float(after.mean()):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heal", nargs="+", default=["heal:minutes=5"])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--smollm", nargs="*", default=None)
    parser.add_argument("--minilm", nargs="*", default=None)
    parser.add_argument("--skip", choices=["smollm", "minilm"], action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/heal_quality.json")
    opts = parser.parse_args()
    torch.manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(opts.out)

    def save() -> None:
        atomic_file(out, json.dumps(result, indent=2, default=str) + "\n")

    if "minilm" not in opts.skip:
        minilm(opts, result, save)
    if "smollm" not in opts.skip:
        smollm(opts, result, save)
    save()
    if "smollm2" in result:
        print("\n| SmolLM2 variant | x dense | heal | healed x dense | target | heal s |")
        print("|---|---|---|---|---|---|")
        for r in result["smollm2"]["rows"][1:]:
            target = f"<= {r['target']}" if r["target"] else "-"
            print(f"| {r['variant']} | {r['ratio']:.2f} | {r['heal_spec']} | "
                  f"{r['healed_ratio']:.2f} | {target} | {r['heal']['seconds']} |")
    if "minilm" in result:
        print("\n| MiniLM variant | cosine | heal | healed cosine | target |")
        print("|---|---|---|---|---|")
        for r in result["minilm"]["rows"]:
            print(f"| {r['variant']} | {r['cosine_mean']:.4f} | {r['heal_spec']} | "
                  f"{r['healed_cosine_mean']:.4f} | >= 0.95 |")


if __name__ == "__main__":
    main()
