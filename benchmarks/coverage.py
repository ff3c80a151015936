"""Coverage table: every zoo architecture x attention implementation -> sites found, patterns,
identity error of the canonicalized program at the capture length and two others.

    .venv/bin/python benchmarks/coverage.py [--out benchmarks/results/coverage.json]

Prints a Markdown table and writes JSON. The zoo lives in tests/zoo.py (tiny random weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import rewriter as rw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402

SHAPES = ((2, 7), (3, 9), (1, 13))  # (batch, seq): capture shape first


def run_entry(entry) -> dict:
    torch.manual_seed(0)
    model = entry.build()
    args, kwargs = entry.inputs(*SHAPES[0])
    prog = rw.capture(model, args, kwargs)
    errors = []
    for batch, seq in SHAPES:
        a, k = entry.inputs(batch, seq)
        errors.append(prog.verify(model, a, k).max_rel)
    found = [(s.num_heads, s.num_kv_heads, s.head_dim) for s in prog.sites]
    return {
        "name": entry.name,
        "sites": len(prog.sites),
        "expected": len(entry.sites),
        "heads_match": found == [tuple(s) for s in entry.sites],
        "patterns": sorted({s.pattern + (f"+{s.kv_expansion}" if s.kv_expansion != "none"
                                         else "") for s in prog.sites}),
        "positional": sorted({s.positional for s in prog.sites}),
        "identity_rel_error": errors,
        "max_rel_error": max(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/coverage.json")
    opts = parser.parse_args()
    rows = []
    for entry in zoo.ZOO:
        try:
            rows.append(run_entry(entry))
        except Exception as exc:  # report, keep going: this is a table, not a test
            rows.append({"name": entry.name, "error": f"{type(exc).__name__}: {exc}"})
    negatives = []
    for entry in zoo.NEGATIVES:
        model = entry.build()
        args, kwargs = entry.inputs(*SHAPES[0])
        prog = rw.capture(model, args, kwargs, require_attention=False)
        negatives.append({"name": entry.name, "sites": len(prog.sites),
                          "rejected": [r.reason for r in prog.rejected]})
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"zoo": rows, "negatives": negatives}, indent=2) + "\n")
    print("| model | sites (expected) | heads ok | patterns | positional | identity rel. error "
          f"at {', '.join(f'{b}x{s}' for b, s in SHAPES)} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'][:80]} | | | | |")
            continue
        errs = " / ".join(f"{e:.1e}" for e in r["identity_rel_error"])
        ok = "yes" if r["heads_match"] else "NO"
        print(f"| {r['name']} | {r['sites']} ({r['expected']}) | {ok} | "
              f"{', '.join(r['patterns'])} | {', '.join(r['positional'])} | {errs} |")
    for n in negatives:
        reasons = "; ".join(n["rejected"]) or "no softmax"
        print(f"| {n['name']} (negative) | {n['sites']} | | rejected: {reasons} | | |")


if __name__ == "__main__":
    main()
