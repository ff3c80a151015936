"""ONNX Runtime (CPU) vs torch eager latency for SmolLM2, dense and rewritten, both targets.

    .venv/bin/python benchmarks/onnx.py [--model smollm2-135m] [--lengths 128,512,2048]
        [--variants dense,gqa+sparse] [--decode-past 512] [--repeats 3]
        [--out benchmarks/results/onnx.json]

Per variant the program is exported once per target (dynamic axes) and every length runs on
the same file. Batch 1, one forward over the whole prompt (prefill); medians after a warm-up,
torch and ORT runs interleaved so machine noise hits both alike. "dense" times the Hugging Face
model itself in torch; "gqa+sparse" (one KV head, mean-merged: latency does not depend on the
merge) times its rewritten program.

Decode rows ("mode": "decode"): one new token after a cache of --decode-past tokens, with the
decoder exported with kv_cache=True, against the same decoder step in torch eager (the cache
surgery's GraphModule). Writes JSON; asserts nothing.
"""

# ruff: noqa: E402  (the sys.path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder leads sys.path and "onnx" would import this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.io.text import token_windows
from rewriter.models import load

VARIANTS = {"dense": None, "sparse": ["sparse:window=256,sink=4"],
            "gqa+sparse": ["gqa:kv-heads=1,merge=mean", "sparse:window=256,sink=4"]}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def decode_rows(prog, variant: str, opts, tokenizer, pasts: list[int], tmp: str) -> list[dict]:
    """Per-token latency of one decode step after ``past`` cached tokens, ORT vs torch."""
    import numpy as np

    from rewriter.decoder import build_decoder

    dec = build_decoder(prog)
    rows = []
    for target in opts.targets.split(","):
        path = Path(tmp) / f"{variant}-{target}-decoder.onnx"
        t0 = time.perf_counter()
        prog.export_onnx(path, target, kv_cache=True)
        export_s = time.perf_counter() - t0
        sess = rwonnx.session(path, threads=torch.get_num_threads())
        for past_len in pasts:
            ids = token_windows(tokenizer, past_len + 1, 1)
            _, past = dec.step(ids[:, :-1], dec.empty_cache(1))
            token = ids[:, -1:]
            feed = {"input_ids": token.numpy(),
                    **{name: t.numpy() for name, t in zip(dec.input_names[1:], past,
                                                          strict=True)}}
            want, _ = dec.step(token, past)
            got = sess.run(None, feed)[0]
            rel = float(np.abs(got - want.numpy()).max() / want.abs().max())
            torch_ms = median_ms(lambda token=token, past=past: dec.step(token, past),
                                 opts.repeats * 5)
            ort_ms = median_ms(lambda feed=feed, sess=sess: sess.run(None, feed),
                               opts.repeats * 5)
            row = {"mode": "decode", "variant": variant, "spec": VARIANTS[variant],
                   "target": target, "past": past_len, "torch_eager_ms": round(torch_ms, 2),
                   "ort_ms": round(ort_ms, 2), "speedup": round(torch_ms / ort_ms, 3),
                   "max_rel_err": rel, "export_s": round(export_s, 1),
                   "cache_entries": len(dec.cache)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--variants", default="dense,gqa+sparse")
    parser.add_argument("--targets", default="onnx,ort")
    parser.add_argument("--decode-past", default="512",
                        help="cache lengths for the decode rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/onnx.json")
    opts = parser.parse_args()
    lengths = [int(x) for x in opts.lengths.split(",")]

    loaded = load(opts.model)
    base = loaded.capture(16, batch=1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in opts.variants.split(","):
            prog = base if VARIANTS[variant] is None else rw.rewrite(base, VARIANTS[variant])
            for target in opts.targets.split(","):
                path = Path(tmp) / f"{variant}-{target}.onnx"
                t0 = time.perf_counter()
                rows = prog.export_onnx(path, target)
                export_s = time.perf_counter() - t0
                sess = rwonnx.session(path, threads=torch.get_num_threads())
                # dense: the HF model itself; rewritten: its program module
                model = loaded.model if VARIANTS[variant] is None else prog.module
                for n in lengths:
                    ids = token_windows(loaded.tokenizer, n, 1)
                    args, kwargs = prog.call_with_tokens(ids)
                    with torch.no_grad():
                        want = prog.module(*args, **kwargs)
                    got = rwonnx.run(sess, *args, **kwargs)[0]
                    want = want.logits if hasattr(want, "logits") else want
                    rel = float((got - want).abs().max() / want.abs().max())

                    def eager(model=model, args=args, kwargs=kwargs):
                        with torch.no_grad():
                            model(*args, **kwargs)

                    def ort_run(sess=sess, args=args, kwargs=kwargs):
                        rwonnx.run(sess, *args, **kwargs)

                    torch_ms = median_ms(eager, opts.repeats)
                    ort_ms = median_ms(ort_run, opts.repeats)
                    row = {"mode": "prefill", "variant": variant, "spec": VARIANTS[variant],
                           "target": target, "seq_len": n, "torch_eager_ms": round(torch_ms, 2),
                           "ort_ms": round(ort_ms, 2), "speedup": round(torch_ms / ort_ms, 3),
                           "max_rel_err": rel, "export_s": round(export_s, 1),
                           "ops": sorted({r["op"] for r in rows})}
                    print(json.dumps(row), flush=True)
                    results.append(row)
            pasts = [int(x) for x in opts.decode_past.split(",") if x]
            if pasts:
                results += decode_rows(prog, variant, opts, loaded.tokenizer, pasts, tmp)
    doc = {"model": opts.model, "batch": 1, "repeats": opts.repeats,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "onnxruntime": __import__("onnxruntime").__version__,
           "machine": platform.processor() or platform.machine(),
           "results": results}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
