"""Capture + find + canonicalize vs a bare torch.export of the same model, in one run.

    .venv/bin/python benchmarks/capture_overhead.py [--model smollm2-135m] [--seq-len 16]
        [--repeats 3] [--out benchmarks/results/capture_overhead.json]

Runs are interleaved (export, capture, export, capture, ...) after one warm-up of each, and the
medians are compared, so machine noise hits both sides alike. Writes JSON; asserts nothing.
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
from rewriter.ir.export import dynamic_shapes_for
from rewriter.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/capture_overhead.json")
    opts = parser.parse_args()

    loaded = load(opts.model)
    args, kwargs = loaded.example_inputs(opts.seq_len, batch=2)
    model = loaded.model

    def bare_export():
        shapes = dynamic_shapes_for(model, args, kwargs)
        with torch.no_grad():
            torch.export.export(model, args, kwargs=kwargs, strict=False, dynamic_shapes=shapes)

    def full_capture():
        rw.capture(model, args, kwargs)

    bare_export()  # warm-up: first export pays one-time import and dispatcher costs
    full_capture()
    export_s, capture_s = [], []
    for _ in range(opts.repeats):
        for fn, acc in ((bare_export, export_s), (full_capture, capture_s)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)

    prog = rw.capture(model, args, kwargs)
    result = {
        "model": loaded.name,
        "seq_len": opts.seq_len,
        "batch": 2,
        "repeats": opts.repeats,
        "sites": len(prog.sites),
        "export_s": export_s,
        "capture_s": capture_s,
        "export_median_s": statistics.median(export_s),
        "capture_median_s": statistics.median(capture_s),
        "ratio": statistics.median(capture_s) / statistics.median(export_s),
        "capture_breakdown_s": prog.manifest["timings"],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    out = Path(opts.out)
    atomic_file(out, json.dumps(result, indent=2) + "\n")
    print(f"{loaded.name}: export {result['export_median_s']:.2f}s, capture "
          f"{result['capture_median_s']:.2f}s, ratio {result['ratio']:.2f}x "
          f"({len(prog.sites)} sites) -> {out}")


if __name__ == "__main__":
    main()
