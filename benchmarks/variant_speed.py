"""Speed, memory and KV cache of SmolLM2 variants against dense, in torch eager and ONNX Runtime
on CPU: prefill and one decode step at long contexts (issue #14).

    .venv/bin/python benchmarks/variant_speed.py [--variants dense,gqa,window,auto,share-kv,prune]
        [--lengths 2048,8192] [--pasts 1024,4096,16384] [--backends torch,onnxruntime]
        [--targets ort] [--repeats 3] [--decode-steps 3] [--threads 2] [--no-memory]
        [--memory-max-len N]
        [--out benchmarks/results/variant_speed.json]
    # quick: --lengths 256 --pasts 64,128 --variants dense,gqa --repeats 1

Variants (short name: specs): dense: none; gqa: gqa:kv-heads=1,merge=mean; window:
sparse:window=256,sink=4; auto: sparse:heads=auto,density=0.25 (calibrated on
--calib-batches windows of --calib-len tokens from the start of the pydoc text, as
benchmarks/sparse_quality.py); share-kv: share-kv:group=2; prune: prune-heads:ratio=0.22
(default score: gradient, on the same calibration windows).

Measurements, batch 1, per (backend, mode, length) "point":
- prefill: one forward over N prompt tokens (pydoc text). torch: the program's module
  (rewriter.analysis.quality.logits_fn); ONNX Runtime: ``prog.export_onnx(path, target)`` run
  with ``rewriter.onnx.session(path, threads=T)``, once per --targets entry. tokens/s = N / time.
- decode: one new token after P past tokens. torch: ``prog.decoder()`` (rewriter.decoder);
  ONNX Runtime: ``prog.export_onnx(path, target, kv_cache=True)``. The past is not prefilled:
  each cache entry is filled with random values of its shape [1, Hkv, P', D] (P' = P, or
  min(P, entry.bound) for a bounded sink+window entry), plus the 0-d int64 ``past_length``
  input when the decoder has one; a step's time does not depend on the values. tokens/s =
  1 / step time; every repeat times --decode-steps steps on the same past.
- time: in this process, candidates interleaved (a warm-up call each, then for every repeat
  one run of every variant in turn), median over repeats (decode: over all steps).
- memory: each (variant, backend, mode, length) is run again in a fresh subprocess that loads
  only what the measurement needs (torch: the pickled GraphModule, weights included; ONNX
  Runtime: the session alone, no torch import), builds the same inputs and runs the call twice.
  RSS is read from /proc/self/status (VmHWM, VmRSS; not getrusage's ru_maxrss, into which
  Linux carries the parent's high-water mark across fork/exec): ``setup_rss_mb`` is the RSS
  after loading and building the inputs, ``setup_peak_rss_mb`` the peak until then (an ORT
  session peaks while it optimizes the graph); VmHWM is then reset (/proc/self/clear_refs) and
  ``run_peak_rss_mb`` is the peak during the calls, ``run_rss_mb`` = run peak - setup RSS (what
  the calls add: activations, outputs, the present cache), ``peak_rss_mb`` the process's overall
  peak (interpreter, libraries, weights, inputs, activations, outputs).
- cache: ``cache_bytes`` sums the actual past tensors' nbytes (fp32) at P;
  ``accounting_kv_bytes_per_token_bf16`` is ``prog.accounting()["kv_cache_bytes_per_token"]``
  (bf16, every token kept) and ``accounting_cache_bytes_bf16`` that times P (with the
  accounting's own per-head bounds where it reports them).

Every row has ratios to dense at the same point: ``speed_x_dense`` = dense time / variant time,
``memory_x_dense``, ``cache_x_dense``. The ``targets`` section is evaluated from the rows:
decode with sink+window ("window") after the largest past <= 1.2x its time after the smallest
(the issue: 16k vs 1k) and <= 0.5x dense at the largest; prefill of "window" at the largest
length >= 0.8x the FLOP-proportional ideal speedup over dense; no variant slower than dense at
any point (violations listed). Ideal speedup = F(dense) / F(window) with, for N tokens,

    F = 2 N sum(out x in of every aten.linear weight: q/k/v/o, MLP, lm_head)   (linear layers)
      + prog.accounting(N)["attention_flops"]    (2 x kept causal scores x (D + Dv), all heads)

(elementwise ops and the embedding gather ignored; SmolLM2 at 8192: about 2.2 + 2.3 TFLOP dense,
2.2 + 0.15 with window 256 + sink 4, about 1.9x). Writes JSON after every point; asserts nothing.
"""

# ruff: noqa: E402  (the sys.path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder leads sys.path and benchmarks/onnx.py would shadow onnx.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

VARIANTS = {
    "dense": [],
    "gqa": ["gqa:kv-heads=1,merge=mean"],
    "window": ["sparse:window=256,sink=4"],
    "auto": ["sparse:heads=auto,density=0.25"],
    "share-kv": ["share-kv:group=2"],
    "prune": ["prune-heads:ratio=0.22"],
}
CALIBRATED = {"auto", "prune"}
WINDOW = "window"  # the sink+window variant the targets are about


# --- inputs ----------------------------------------------------------------------------------

def decode_inputs(entries, input_names: list[str], past: int, *, seed: int = 0) -> dict:
    """Inputs of one decode step after ``past`` tokens, by name, in ``input_names`` order: one
    token id, random past tensors [1, Hkv, min(past, bound) or past, D] per cache entry (fp32),
    and the 0-d int64 ``past_length`` when the decoder takes it (bounded caches)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    feed = {"input_ids": torch.randint(0, 1000, (1, 1), generator=gen)}
    for e in entries:
        bound = getattr(e, "bound", None)
        n = past if bound is None else min(past, bound)
        feed[e.input_name] = torch.randn(1, e.heads, n, e.head_dim, generator=gen)
    if "past_length" in input_names:
        feed["past_length"] = torch.tensor(past, dtype=torch.int64)
    return {name: feed[name] for name in input_names}


def cache_bytes(feed: dict) -> int:
    return sum(t.nbytes for name, t in feed.items() if name.startswith("past_")
               and name != "past_length")


def accounting_bytes(prog, past: int) -> tuple[int, int]:
    """(bf16 bytes per token, bf16 bytes at ``past``) from the program's accounting; the
    latter uses per-KV-head bounds where the accounting reports them (``kv_bound``)."""
    acc = prog.accounting(64)  # the per-token bytes and bounds do not depend on ctx
    per_token = acc["kv_cache_bytes_per_token"]
    total = 0
    for row, site in zip(acc["sites"], prog.sites, strict=True):
        bounds = row.get("kv_bound")
        if not row["kv_bytes_per_token"]:
            continue
        if not bounds:
            total += row["kv_bytes_per_token"] * past
            continue
        per_head = row["kv_bytes_per_token"] // site.num_kv_heads
        total += sum(per_head * (past if b is None else min(past, b)) for b in bounds)
    return per_token, total


# --- FLOPs -----------------------------------------------------------------------------------

def linear_flops_per_token(prog) -> int:
    """2 x the weight elements of every aten.linear in the program's graph."""
    import torch

    from rewriter.ir.graph import fetch_attr

    total = 0
    for node in prog.module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            weight = node.args[1]
            shape = weight.meta["val"].shape if "val" in weight.meta else \
                fetch_attr(prog.module, weight.target).shape
            total += 2 * int(shape[0]) * int(shape[1])
    return total


def forward_flops(prog, n: int) -> dict:
    linear = linear_flops_per_token(prog) * n
    attention = prog.accounting(n)["attention_flops"]
    return {"linear": linear, "attention": attention, "total": linear + attention}


# --- memory subprocess -----------------------------------------------------------------------

def ort_session(path, threads: int, arena: bool):
    """As rewriter.onnx.session(path, threads=threads), optionally without the CPU memory
    arena: a session keeps its arena's high-water mark, and six sessions that each peaked
    at several GB (8k prefill) do not fit in 24 GB together."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def child(job_path: str) -> None:
    """Run one measurement in this fresh process and print its peak RSS as JSON (the job is
    written by `measure_memory`)."""
    job = json.loads(Path(job_path).read_text())

    def status_mb(key: str) -> float:
        """VmHWM (peak RSS since exec or the last reset; not ru_maxrss: Linux carries the
        parent's high-water mark into it across fork/exec) or VmRSS (current), in MiB."""
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith(key + ":"))) / 1024

    import numpy as np

    rng = np.random.default_rng(0)

    def make(spec):
        shape, dtype = spec["shape"], spec["dtype"]
        if dtype == "int64":
            if spec.get("value") is not None:
                return np.array(spec["value"], dtype=np.int64).reshape(shape)
            return rng.integers(0, 1000, size=shape, dtype=np.int64)
        return rng.standard_normal(size=shape, dtype=np.float32)

    if job["backend"] == "torch":
        import torch

        import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.*)

        torch.set_num_threads(job["threads"])
        module = torch.load(job["path"], weights_only=False)
        args = [torch.from_numpy(make(s)) for s in job["inputs"]]
        kwargs = job["kwargs"]

        def call():
            with torch.no_grad():
                return module(*args, **kwargs)
    else:

        sess = ort_session(job["path"], job["threads"], job["arena"])
        feed = {s["name"]: make(s) for s in job["inputs"]}

        def call():
            return sess.run(None, feed)

    setup_peak, setup = status_mb("VmHWM"), status_mb("VmRSS")
    try:  # reset VmHWM to the current RSS, so the calls' own peak is seen (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    for _ in range(2):
        out = call()
        del out
    seconds = time.perf_counter() - t0
    run_peak = status_mb("VmHWM")
    print(json.dumps({"setup_rss_mb": round(setup, 1), "setup_peak_rss_mb": round(setup_peak, 1),
                      "peak_rss_mb": round(max(setup_peak, run_peak), 1),
                      "run_peak_rss_mb": round(run_peak, 1) if reset else None,
                      "seconds_two_calls": round(seconds, 3)}))


def tensor_spec(name: str, t) -> dict:
    import torch

    spec = {"name": name, "shape": list(t.shape),
            "dtype": "int64" if t.dtype == torch.int64 else "float32"}
    if name == "past_length":
        spec["value"] = int(t)
    return spec


def measure_memory(job: dict, tmp: str) -> dict:
    path = Path(tempfile.mkstemp(suffix=".json", dir=tmp)[1])
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])})
    path.unlink()
    if proc.returncode != 0:
        return {"memory_error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["run_rss_mb"] = round((r.get("run_peak_rss_mb") or r["peak_rss_mb"]) - r["setup_rss_mb"], 1)
    return r


def picklable(module, tmp: str, name: str) -> str:
    """torch.save a plain GraphModule over ``module``'s graph (export's input guards dropped:
    they do not pickle) for the memory subprocess; returns its path."""
    import torch
    from torch.fx import CodeGen, GraphModule

    from rewriter.ir.graph import copy_graph

    path = Path(tmp) / f"{name}.pt"
    if not path.exists():
        graph = copy_graph(module)
        for node in list(graph.nodes):
            if node.op == "call_module" and str(node.target).startswith("_guards"):
                graph.erase_node(node)
        graph.set_codegen(CodeGen())  # plain forward(input_ids, ...): pickles
        torch.save(GraphModule(module, graph), path)
    return str(path)


# --- timing ----------------------------------------------------------------------------------

def interleaved(runners: dict, repeats: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each runner: a warm-up call each, then ``repeats`` rounds of
    ``inner`` calls of every runner in turn."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()
    for _ in range(repeats):
        for name, fn in runners.items():
            for _ in range(inner):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class Candidate:
    """One variant: its program, torch decoder and ONNX files (made on demand)."""

    def __init__(self, name: str, prog, tmp: str):
        self.name, self.prog, self.tmp = name, prog, tmp
        self._decoder = None
        self.files: dict[tuple[str, bool], str] = {}
        self.export_s: dict[str, float] = {}

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = self.prog.decoder()
        return self._decoder

    def onnx(self, target: str, kv_cache: bool) -> str:
        key = (target, kv_cache)
        if key not in self.files:
            path = Path(self.tmp) / f"{self.name}-{target}{'-decoder' if kv_cache else ''}.onnx"
            t0 = time.perf_counter()
            self.prog.export_onnx(path, target, kv_cache=kv_cache)
            self.export_s[f"{target}{'-decoder' if kv_cache else ''}"] = round(
                time.perf_counter() - t0, 1)
            self.files[key] = str(path)
        return self.files[key]


def run_point(cands: dict, backend: str, target: str | None, mode: str, n: int, opts,
              tokenizer, tmp: str) -> list[dict]:
    """Time every candidate at one point (interleaved), then measure each one's memory."""
    import torch

    from rewriter import onnx as rwonnx
    from rewriter.analysis.quality import logits_fn
    from rewriter.io.text import token_windows

    runners, jobs, extra = {}, {}, {}
    if mode == "prefill":
        ids = token_windows(tokenizer, n, 1)
    for name, c in cands.items():
        if mode == "prefill":
            args, kwargs = c.prog.call_with_tokens(ids)
            if backend == "torch":
                fn = logits_fn(c.prog)

                def run(fn=fn):
                    with torch.no_grad():
                        fn(ids)
                jobs[name] = {"backend": "torch", "path": picklable(c.prog.module, tmp, name),
                              "inputs": [tensor_spec("input_ids", ids)],
                              "kwargs": {k: v for k, v in kwargs.items()
                                         if not isinstance(v, torch.Tensor)}}
            else:
                sess = ort_session(c.onnx(target, False), opts.threads, opts.ort_arena)

                def run(sess=sess, args=args, kwargs=kwargs):
                    rwonnx.run(sess, *args, **kwargs)
                jobs[name] = {"backend": "onnxruntime", "path": c.onnx(target, False),
                              "inputs": [tensor_spec(i.name, ids) for i in sess.get_inputs()]}
            extra[name] = {}
        else:
            dec = c.decoder
            if backend == "torch":
                feed = decode_inputs(dec.cache, dec.input_names, n)
                values = list(feed.values())

                def run(dec=dec, values=values):
                    dec.step(values[0], values[1:])
                path = picklable(dec.module, tmp, f"{name}-decoder")
            else:
                path = c.onnx(target, True)
                sess = ort_session(path, opts.threads, opts.ort_arena)
                names = [i.name for i in sess.get_inputs()]
                feed = decode_inputs(dec.cache, names, n)
                np_feed = {k: v.numpy() for k, v in feed.items()}

                def run(sess=sess, np_feed=np_feed):
                    sess.run(None, np_feed)
            jobs[name] = {"backend": backend, "path": path, "kwargs": {},
                          "inputs": [tensor_spec(k, v) for k, v in feed.items()]}
            per_token, at_past = accounting_bytes(c.prog, n)
            extra[name] = {"cache_bytes": cache_bytes(feed), "cache_entries": len(dec.cache),
                           "bounded_entries": sum(getattr(e, "bound", None) is not None
                                                  for e in dec.cache),
                           "accounting_kv_bytes_per_token_bf16": per_token,
                           "accounting_cache_bytes_bf16": at_past}
        runners[name] = run
    seconds = interleaved(runners, opts.repeats, opts.decode_steps if mode == "decode" else 1)
    del runners
    rows = []
    for name, s in seconds.items():
        row = {"variant": name, "spec": VARIANTS[name], "backend": backend, "target": target,
               "mode": mode, "seq_len" if mode == "prefill" else "past": n,
               "ms": round(1e3 * s, 3), "tokens_per_s": round((n if mode == "prefill" else 1) / s,
                                                              2), **extra[name]}
        if not opts.no_memory and (mode == "decode" or n <= opts.memory_max_len):
            jobs[name]["threads"], jobs[name]["arena"] = opts.threads, opts.ort_arena
            row.update(measure_memory(jobs[name], tmp))
        rows.append(row)
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for row in rows:
        if dense is None:
            break
        row["speed_x_dense"] = round(dense["ms"] / row["ms"], 3)
        if "peak_rss_mb" in row and "peak_rss_mb" in dense:
            row["memory_x_dense"] = round(row["peak_rss_mb"] / dense["peak_rss_mb"], 3)
        if "cache_bytes" in row and dense.get("cache_bytes"):
            row["cache_x_dense"] = round(row["cache_bytes"] / dense["cache_bytes"], 4)
    return rows


# --- targets ---------------------------------------------------------------------------------

def evaluate_targets(rows: list[dict], ideal: dict | None) -> dict:
    def find(variant, backend, target, mode, n):
        key = "seq_len" if mode == "prefill" else "past"
        return next((r for r in rows if r["variant"] == variant and r["backend"] == backend
                     and r["target"] == target and r["mode"] == mode and r[key] == n), None)

    out: dict = {"decode_largest_vs_smallest_past": [], "decode_vs_dense_at_largest_past": [],
                 "prefill_vs_ideal_at_largest_length": [], "no_variant_slower_than_dense": {}}
    backends = sorted({(r["backend"], r["target"] or "") for r in rows})
    pasts = sorted({r["past"] for r in rows if r["mode"] == "decode"})
    lengths = sorted({r["seq_len"] for r in rows if r["mode"] == "prefill"})
    for backend, target in backends:
        target = target or None
        where = {"backend": backend, "target": target}
        if len(pasts) >= 2:
            lo = find(WINDOW, backend, target, "decode", pasts[0])
            hi = find(WINDOW, backend, target, "decode", pasts[-1])
            if lo and hi:
                ratio = hi["ms"] / lo["ms"]
                out["decode_largest_vs_smallest_past"].append(
                    {**where, "variant": WINDOW, "pasts": [pasts[0], pasts[-1]],
                     "ratio": round(ratio, 3), "limit": 1.2, "met": ratio <= 1.2})
        if pasts:
            hi = find(WINDOW, backend, target, "decode", pasts[-1])
            dense = find("dense", backend, target, "decode", pasts[-1])
            if hi and dense:
                ratio = hi["ms"] / dense["ms"]
                out["decode_vs_dense_at_largest_past"].append(
                    {**where, "variant": WINDOW, "past": pasts[-1], "time_x_dense":
                     round(ratio, 3), "limit": 0.5, "met": ratio <= 0.5})
        if lengths and ideal:
            win = find(WINDOW, backend, target, "prefill", lengths[-1])
            dense = find("dense", backend, target, "prefill", lengths[-1])
            if win and dense:
                speedup = dense["ms"] / win["ms"]
                need = 0.8 * ideal["ideal_speedup"]
                out["prefill_vs_ideal_at_largest_length"].append(
                    {**where, "variant": WINDOW, "seq_len": lengths[-1],
                     "speedup": round(speedup, 3), "ideal_speedup": ideal["ideal_speedup"],
                     "needed": round(need, 3), "met": speedup >= need})
    violations = [{k: r[k] for k in ("variant", "backend", "target", "mode", "seq_len", "past",
                                     "ms", "speed_x_dense") if k in r}
                  for r in rows if r.get("speed_x_dense", 1.0) < 1.0]
    out["no_variant_slower_than_dense"] = {"met": not violations, "violations": violations}
    out["ideal_flops"] = ideal
    return out


# --- main ------------------------------------------------------------------------------------

def build(names: list[str], opts):
    import rewriter as rw
    from rewriter.api import calibration_batches
    from rewriter.models import load

    loaded = load(opts.model)
    base = loaded.capture(16, batch=1)
    calibration, progs, rewrite_s = None, {}, {}
    for name in names:
        t0 = time.perf_counter()
        if not VARIANTS[name]:
            progs[name] = base
        else:
            if name in CALIBRATED and calibration is None:
                calibration = calibration_batches(base, None, seq_len=opts.calib_len,
                                                  batches=opts.calib_batches)
            progs[name] = rw.rewrite(base, VARIANTS[name],
                                     calibration=calibration if name in CALIBRATED else None)
        rewrite_s[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {VARIANTS[name]} ready in {rewrite_s[name]} s", flush=True)
    return loaded, progs, rewrite_s


def ideal_speedup(progs: dict, n: int) -> dict | None:
    if "dense" not in progs or WINDOW not in progs:
        return None
    dense, win = forward_flops(progs["dense"], n), forward_flops(progs[WINDOW], n)
    return {"seq_len": n, "dense_flops": dense, "window_flops": win,
            "ideal_speedup": round(dense["total"] / win["total"], 3),
            "formula": "F = 2 N sum(linear weight elements) + attention_flops(N) "
                       "(2 x kept causal scores x (D + Dv) x heads); ideal = F(dense) / "
                       "F(window)"}


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="variant speed (batch 1, CPU)")
    for col in ("mode", "N / past", "backend", "variant", "ms", "tok/s", "x dense", "peak MB",
                "run MB", "cache MB"):
        table.add_column(col, justify="right")
    for r in rows:
        backend = r["backend"] + (f":{r['target']}" if r["target"] else "")
        table.add_row(r["mode"], str(r.get("seq_len", r.get("past"))), backend, r["variant"],
                      f"{r['ms']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['speed_x_dense']:.2f}" if "speed_x_dense" in r else "-",
                      f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-",
                      f"{r['run_rss_mb']:.0f}" if "run_rss_mb" in r else "-",
                      f"{r['cache_bytes'] / 2**20:.1f}" if "cache_bytes" in r else "-")
    Console(width=140).print(table)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--lengths", default="2048,8192", help="prefill lengths ('' for none)")
    parser.add_argument("--pasts", default="1024,4096,16384",
                        help="past tokens before the decode step ('' for none)")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--targets", default="ort", help="ONNX export targets: ort, onnx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=3,
                        help="timed decode steps per repeat (median over all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-len", type=int, default=1024)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--no-ort-arena", dest="ort_arena", action="store_false",
                        help="ONNX Runtime sessions without the CPU memory arena (needed for "
                        "8k prefill: every session keeps its peak otherwise)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--memory-max-len", type=int, default=1 << 30,
                        help="no peak-RSS subprocess for prefills longer than this")
    parser.add_argument("--out", default="benchmarks/results/variant_speed.json")
    opts = parser.parse_args()
    names = [v for v in opts.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    backends = [b for b in opts.backends.split(",") if b]
    points = [(b, t) for b in backends
              for t in ([None] if b == "torch" else [t for t in opts.targets.split(",") if t])]

    import torch

    from rewriter.io.atomic import atomic_file

    torch.set_num_threads(opts.threads)
    loaded, progs, rewrite_s = build(names, opts)
    lengths, pasts = ints(opts.lengths), ints(opts.pasts)
    doc = {"model": opts.model, "batch": 1, "repeats": opts.repeats,
           "decode_steps": opts.decode_steps, "threads": opts.threads,
           "ort_arena": opts.ort_arena,
           "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "variants": {n: VARIANTS[n] for n in names}, "rewrite_s": rewrite_s,
           "calibration": {"seq_len": opts.calib_len, "batches": opts.calib_batches},
           "parameters": {n: p.parameter_count() for n, p in progs.items()},
           "results": [], "targets": {}}
    ideal = ideal_speedup(progs, max(lengths)) if lengths else None
    out = Path(opts.out)
    with tempfile.TemporaryDirectory() as tmp:
        cands = {n: Candidate(n, p, tmp) for n, p in progs.items()}
        for backend, target in points:
            for mode, ns in (("prefill", lengths), ("decode", pasts)):
                for n in ns:
                    t0 = time.perf_counter()
                    rows = run_point(cands, backend, target, mode, n, opts, loaded.tokenizer,
                                     tmp)
                    for r in rows:
                        print(json.dumps(r), flush=True)
                    print(f"# {backend} {target or ''} {mode} {n}: "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                    doc["results"] += rows
                    doc["export_s"] = {n: c.export_s for n, c in cands.items()}
                    doc["targets"] = evaluate_targets(doc["results"], ideal)
                    atomic_file(out, json.dumps(doc, indent=2) + "\n")
    print_table(doc["results"])
    print(json.dumps({k: v for k, v in doc["targets"].items() if k != "ideal_flops"}, indent=1))


if __name__ == "__main__":
    main()
