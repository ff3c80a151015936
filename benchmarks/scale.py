"""Time, peak memory and bytes on disk of converting a model of real size (issue #15).

    .venv/bin/python benchmarks/scale.py [--config 1b] [--dtypes float32,bfloat16]
        [--variant gqa:kv-heads=2,merge=mean] [--onnx-target ort] [--workdir DIR]
        [--out benchmarks/results/scale.json]
    # quick: --config tiny

A random-initialized Llama-shaped model (``1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192, vocab 32000: 1.1 B parameters; ``tiny``: the same shape at hidden 256, 2 layers) is
written once per dtype as a Hugging Face directory (safetensors, with MiniLM's tokenizer, whose
ids fit the vocabulary). Then one fresh subprocess per
dtype runs what a user runs, in order, and reads its own memory after every step:

    load (rewriter.models.load, the dtype)  ->  capture (16 tokens)  ->  rewrite (--variant)
    ->  save (Program.save)  ->  onnx (Program.export_onnx, --onnx-target; external data when
    over 1.5 GiB)  ->  reload (rewriter.load of the saved directory)

For each step: seconds, ``peak_rss_gb`` (VmHWM from /proc/self/status: the process's peak so
far, so the value after "onnx" covers load + capture + rewrite + save + export) and
``rss_gb`` (VmRSS after the step), both also as ratios to the weight bytes, and the peak
above ``baseline_rss_gb`` (the interpreter, torch and transformers before any weights) as a
ratio; bytes on disk of the saved directory (and of each file in it) and of the ONNX model +
data, with ratios.
Targets (issue #15): saved directory <= 1.1x the weight bytes; peak RSS through the ONNX export
<= 1.5x. ``--memory-cap-gb X`` repeats the first dtype in a memory cgroup capped at X GB (page
cache included, dropped first so the checkpoint is read inside the cap; needs root), once per
``--capped-variants`` spec: with X below the weight bytes, each run shows a model larger than
the memory the process may use converted and exported, since every stage reads weights lazily
(transformers and safetensors map the files), calibration runs one layer block at a time
(rewriter.passes.sequential) and outputs are written one tensor at a time. "reload" also
checks that the reloaded program's logits equal the saved program's, bit for bit. A step that
fails records its one-line error and ends that dtype's run. Writes JSON after each dtype;
asserts nothing.
"""

# ruff: noqa: E402  (the sys.path fix below must run before the imports)
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder leads sys.path and benchmarks/onnx.py would shadow onnx.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000},
}
STEPS = ["load", "capture", "rewrite", "save", "onnx", "reload"]
TARGETS = {"saved_dir_x_weights": 1.1, "peak_rss_through_onnx_x_weights": 1.5}


def memory_gb() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in GB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024 / 1e9
    return fields["VmHWM"], fields["VmRSS"]


def dir_bytes(path: Path) -> dict:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file()}
    return {"total": sum(files.values()), "files": files}


def make_checkpoint(config_name: str, dtype_name: str, directory: Path) -> int:
    """A random-init LlamaForCausalLM in ``dtype`` as a HF directory; returns weight bytes."""
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    config = transformers.LlamaConfig(**CONFIGS[config_name], tie_word_embeddings=False,
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    # a real tokenizer whose ids fit the vocabulary: capture reads example text through it
    from rewriter.models import ZOO, zoo_path

    transformers.AutoTokenizer.from_pretrained(zoo_path(ZOO["minilm-l6"])).save_pretrained(
        directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(spec_path: str) -> None:
    """One dtype's run, in a fresh process; prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import transformers  # noqa: F401  (part of the baseline: every step needs it)

    import rewriter as rw
    from rewriter.models import load

    torch.set_num_threads(spec["threads"])
    weight_bytes = spec["weight_bytes"]
    baseline = memory_gb()[1]  # the interpreter and libraries, before any weights
    out = Path(spec["workdir"])
    steps, state = [], {}

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # record and stop this dtype's run
            steps.append({"step": name, "error": f"{type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"})
            return False
        peak, rss = memory_gb()
        steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_gb": round(peak, 3), "rss_gb": round(rss, 3),
                      "peak_rss_x_weights": round(peak * 1e9 / weight_bytes, 3),
                      "rss_x_weights": round(rss * 1e9 / weight_bytes, 3),
                      "peak_above_baseline_x_weights":
                          round((peak - baseline) * 1e9 / weight_bytes, 3)})
        print(f"  {name}: {steps[-1]}", file=sys.stderr, flush=True)
        return True

    def do_load():
        state["loaded"] = load(spec["checkpoint"], spec["dtype"])

    def do_capture():
        state["prog"] = state.pop("loaded").capture(16, batch=1)

    def do_rewrite():
        state["prog"] = rw.rewrite(state["prog"], spec["variant"])

    def do_save():
        state["prog"].save(out / "saved")

    def do_onnx():
        state["onnx_rows"] = state["prog"].export_onnx(out / "onnx" / "model.onnx",
                                                      spec["onnx_target"])

    def do_reload():  # and check the reloaded program computes what was saved, bit for bit
        ids = torch.arange(3, 19).view(1, 16)
        with torch.no_grad():
            want = state.pop("prog")(ids, use_cache=False).logits
            got = rw.load(out / "saved")(ids, use_cache=False).logits
        if not torch.equal(got, want):
            raise AssertionError("the reloaded program differs from the saved one")

    for name, fn in zip(STEPS, [do_load, do_capture, do_rewrite, do_save, do_onnx, do_reload],
                        strict=True):
        if name == "onnx" and not spec["onnx_target"]:
            continue
        if not step(name, fn):
            break
    result = {"baseline_rss_gb": round(baseline, 3), "steps": steps}
    if (out / "saved").is_dir():
        result["saved"] = dir_bytes(out / "saved")
        result["saved_x_weights"] = round(result["saved"]["total"] / weight_bytes, 3)
    if (out / "onnx").is_dir():
        result["onnx"] = dir_bytes(out / "onnx")
        result["onnx_x_weights"] = round(result["onnx"]["total"] / weight_bytes, 3)
    print(json.dumps(result))


def memory_cgroup(cap_gb: float) -> tuple[Path, str]:
    """A memory cgroup limited to ``cap_gb`` (page cache included), v1 or v2; (its directory,
    the file that reports its peak usage). Needs root."""
    v1 = Path("/sys/fs/cgroup/memory")
    limit = str(int(cap_gb * 1e9))
    if v1.is_dir():
        group = v1 / "rewriter_scale"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(limit)
        (group / "memory.max_usage_in_bytes").write_text("0")
        return group, "memory.max_usage_in_bytes"
    group = Path("/sys/fs/cgroup/rewriter_scale")
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(limit)
    return group, "memory.peak"


def checkpoint_for(opts, dtype: str, workdir: Path) -> tuple[Path, int]:
    """The random checkpoint of --config in ``dtype`` (made once); (path, weight bytes)."""
    checkpoint = workdir / f"hf-{opts.config}-{dtype}"
    size_file = checkpoint / "weight_bytes"
    if not size_file.is_file():
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--make", opts.config, dtype,
                               str(checkpoint)], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"making the {dtype} checkpoint failed: "
                               f"{(made.stderr.strip().splitlines() or ['?'])[-1]}")
        size_file.write_text(made.stdout.strip().splitlines()[-1])
        print(f"{dtype}: checkpoint {int(size_file.read_text()) / 1e9:.2f} GB written in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return checkpoint, int(size_file.read_text())


def run_dtype(opts, dtype: str, workdir: Path, cap_gb: float | None = None) -> dict:
    """One run in a fresh subprocess; its outputs are measured, then deleted (disk space)."""
    checkpoint, weight_bytes = checkpoint_for(opts, dtype, workdir)
    out = workdir / (f"out-{dtype}" + ("" if cap_gb is None else "-capped"))
    spec = {"checkpoint": str(checkpoint), "dtype": dtype, "variant": opts.variant,
            "onnx_target": opts.onnx_target, "threads": opts.threads,
            "weight_bytes": weight_bytes, "workdir": str(out)}
    spec_path = workdir / f"spec-{dtype}.json"
    spec_path.write_text(json.dumps(spec))
    join, group, peak_file = None, None, None
    if cap_gb is not None:
        group, peak_file = memory_cgroup(cap_gb)
        # drop the page cache, so the checkpoint's pages are read (and charged) inside the cap
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

        def join():
            (group / ("tasks" if peak_file.startswith("memory.max_usage") else
                      "cgroup.procs")).write_text(str(os.getpid()))
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)],
                          capture_output=True, text=True, preexec_fn=join)
    sys.stderr.write(proc.stderr[-4000:])
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.startswith("  ")]
        why = (f"killed by signal {-proc.returncode}" + (" (out of memory)" if
                                                         proc.returncode == -9 else "")
               if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1])
        return {"dtype": dtype, "weight_bytes": weight_bytes, "error": why,
                "last_step_done": last[-1].strip() if last else None}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if cap_gb is not None:
        result["memory_cap_gb"] = cap_gb
        result["cgroup_peak_gb"] = round(int((group / peak_file).read_text()) / 1e9, 3)
        result["weights_x_cap"] = round(weight_bytes / 1e9 / cap_gb, 3)
    peak = max((s["peak_rss_x_weights"] for s in result["steps"]
                if s.get("step") != "reload" and "peak_rss_x_weights" in s), default=None)
    result["targets"] = {
        "saved_dir_x_weights": {"value": result.get("saved_x_weights"),
                                "limit": TARGETS["saved_dir_x_weights"],
                                "met": result.get("saved_x_weights") is not None
                                and result["saved_x_weights"] <= TARGETS["saved_dir_x_weights"]},
        "peak_rss_through_onnx_x_weights": {
            "value": peak, "limit": TARGETS["peak_rss_through_onnx_x_weights"],
            "met": peak is not None and peak <= TARGETS["peak_rss_through_onnx_x_weights"]},
    }
    return {"dtype": dtype, "weight_bytes": weight_bytes, **result}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--make":
        print(make_checkpoint(sys.argv[2], sys.argv[3], Path(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="1b", choices=sorted(CONFIGS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variant", default="gqa:kv-heads=2,merge=mean")
    parser.add_argument("--onnx-target", default="ort", help="'' to skip the ONNX export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="also run the first dtype inside a memory cgroup of this many GB "
                        "(page cache included; needs root): a model larger than the memory "
                        "the process may use")
    parser.add_argument("--capped-variants", default="gqa:kv-heads=2,merge=mean|gqa:kv-heads=2",
                        help="'|'-separated specs, each run once inside the cap (default: the "
                        "static mean merge and the calibrated fit, which runs layer by layer)")
    parser.add_argument("--capped-only", action="store_true",
                        help="run only the capped variants; the uncapped runs are kept from "
                        "--out")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    opts = parser.parse_args()

    import torch

    from rewriter.io.atomic import atomic_file

    doc = {"config": {"name": opts.config, **CONFIGS[opts.config]}, "variant": opts.variant,
           "onnx_target": opts.onnx_target, "threads": opts.threads, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "targets": TARGETS, "runs": []}
    if opts.capped_only and Path(opts.out).is_file():
        doc["runs"] = json.loads(Path(opts.out).read_text())["runs"]
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        for dtype in [d for d in opts.dtypes.split(",") if d and not opts.capped_only]:
            doc["runs"].append(run_dtype(opts, dtype, Path(tmp)))
            atomic_file(Path(opts.out), json.dumps(doc, indent=1) + "\n")
        if opts.memory_cap_gb:
            dtype, doc["capped"] = opts.dtypes.split(",")[0], []
            for variant in opts.capped_variants.split("|"):
                capped = argparse.Namespace(**{**vars(opts), "variant": variant})
                doc["capped"].append({"variant": variant, **run_dtype(
                    capped, dtype, Path(tmp), opts.memory_cap_gb)})
                atomic_file(Path(opts.out), json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
