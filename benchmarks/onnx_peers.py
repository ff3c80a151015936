"""SmolLM2-135M on ONNX Runtime (CPU): this project's exports against peer ONNX exporters.

    .venv/bin/python benchmarks/onnx_peers.py [--lengths 128,512,2048] [--decode-past 512,4096]
        [--gen-prompt 512] [--gen-tokens 32] [--repeats 3] [--threads 2]
        [--candidates torch,ours-ort,ours-ort-last,ours-onnx,genai,genai-rt,optimum]
        [--genai-model DIR] [--optimum-model DIR] [--genai-python PATH]
        [--out benchmarks/results/onnx_peers.json]

Quick check: --lengths 32 --decode-past 64 --gen-prompt 32 --gen-tokens 4 --repeats 2.

Candidates (fp32, batch 1, every ONNX Runtime session with --threads intra-op threads, torch
too; within a row the candidates run interleaved, one repeat of each in turn, medians):

- torch: the Hugging Face model (its own attention implementation, sdpa), eager, no_grad;
- ours-ort / ours-onnx: ``prog.export_onnx(path, target, kv_cache=True)`` (the decoder: it
  serves prefill with an empty past too), plus for prefill rows ours-ort-prefill /
  ours-onnx-prefill, the prefill-only graph (``prog.export_onnx(path, target)``);
- ours-<target>-last: the decoder with ``logits="last"`` (logits [1, 1, V], the last
  position's: all that generation reads, so the LM head runs on one row); its logits are
  compared with torch's last row;
- genai: the onnxruntime-genai model builder's fp32 CPU model, run in plain onnxruntime;
- genai-rt: the same model in onnxruntime-genai's own runtime (og.Generator, greedy), generate
  row only, in its own process with --genai-python (it times itself: not interleaved);
- optimum: ``optimum-cli export onnx`` (optimum-onnx) of the same weights, in plain onnxruntime.

A peer whose model directory is not given (or not there) is skipped with a note in the JSON.
Rows: "prefill" (one forward over --lengths tokens; decoders with an empty past), "decode"
(one new token after a cache of --decode-past tokens; every candidate gets the same cache, made
by torch, and its logits are compared with torch's), "generate" (--gen-tokens greedy tokens
after a --gen-prompt token prompt, prefill included, with each candidate's own cache; the
tokens are compared with torch's) and "nodes" (node count of each .onnx file, and after ONNX
Runtime's own graph optimizations, ORT_ENABLE_ALL, saved through
SessionOptions.optimized_model_filepath). Prompts are token windows of pydoc topics. Writes
JSON; asserts nothing.

Peers are built once, outside the project's .venv (their pins differ: optimum-onnx 0.1 wants
transformers < 4.58), from an HF folder of the zoo's SmolLM2 (the project's GGUF loader,
dequantized to fp32; written with a plain model built from the config because transformers
will not save a GGUF-quantized model)::

    .venv/bin/python -c "import transformers; from rewriter.models import load; \\
        m = load('smollm2-135m'); c = m.model.config.to_dict(); c.pop('quantization_config'); \\
        f = transformers.AutoModelForCausalLM.from_config(type(m.model.config).from_dict(c)); \\
        f.load_state_dict(m.model.state_dict()); d = '/work/peers-cache/smollm2-135m-hf'; \\
        f.save_pretrained(d); m.tokenizer.save_pretrained(d)"

    python3.11 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install onnxruntime-genai onnxruntime onnx onnx_ir torch==2.13.0 \\
        transformers
    /work/peers-venv/bin/python -m onnxruntime_genai.models.builder \\
        -i /work/peers-cache/smollm2-135m-hf -o /work/peers-cache/genai-fp32-cpu -p fp32 -e cpu \\
        -c /work/peers-cache/genai-cache

    python3.11 -m venv /work/peers-venv-optimum
    /work/peers-venv-optimum/bin/pip install "optimum-onnx[onnxruntime]" torch==2.13.0
    # transformers 4.x reads rope_theta, not transformers 5's rope_parameters (it would
    # default to 10000, not SmolLM2's 100000): a linked copy whose config.json has both
    mkdir /work/peers-cache/smollm2-135m-hf-v4 && cd /work/peers-cache/smollm2-135m-hf-v4 && \\
        ln -s ../smollm2-135m-hf/* . && rm config.json && python3 -c "import json; \\
        c = json.load(open('../smollm2-135m-hf/config.json')); \\
        c['rope_theta'] = c['rope_parameters']['rope_theta']; c['torch_dtype'] = 'float32'; \\
        json.dump(c, open('config.json', 'w'), indent=2)"
    /work/peers-venv-optimum/bin/optimum-cli export onnx \\
        -m /work/peers-cache/smollm2-135m-hf-v4 --task text-generation-with-past \\
        /work/peers-cache/optimum-fp32

then pass --genai-model /work/peers-cache/genai-fp32-cpu --optimum-model
/work/peers-cache/optimum-fp32 --genai-python /work/peers-venv/bin/python (the defaults).
(The builder's --help fails in onnxruntime-genai 0.18.0, a '%' in its help text; the options
are -i input dir, -o output dir, -p precision, -e execution provider, -c cache dir.)
"""

# ruff: noqa: E402  (the sys.path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder leads sys.path and "onnx" would import this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from importlib import metadata

import numpy as np
import torch

from rewriter import onnx as rwonnx
from rewriter.io.text import token_windows
from rewriter.models import load

CANDIDATES = "torch,ours-ort,ours-ort-last,ours-onnx,genai,genai-rt,optimum"
PEERS_DIR = Path("/work/peers-cache")

# genai-rt: onnxruntime-genai's own runtime (og.Generator, greedy) on the builder's model, in the
# peers' venv (--genai-python); it times itself there: warm-up, then medians of --repeats
GENAI_RT = r"""
import json, statistics, sys, time
import onnxruntime_genai as og
a = json.loads(sys.argv[1])
config = og.Config(a["dir"])
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": a["threads"], "inter_op_num_threads": 1}}}}))
model = og.Model(config)
def run():
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(a["prompt"]) + a["n"])
    gen = og.Generator(model, params)
    gen.append_tokens([a["prompt"]])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(a["prompt"]):]]
tokens = run()
times = []
for _ in range(a["repeats"]):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
print(json.dumps({"tokens": tokens, "ms": round(1e3 * statistics.median(times), 2),
                  "version": og.__version__}))
"""


# Seconds of idle before each timed call. The runtimes' worker threads spin for a while after a
# run (ONNX Runtime's intra-op pool, torch's OpenMP): interleaved back to back, a candidate ran
# on cores the previous one was still spinning on. Measured here on a decode step at 512 past
# (2 threads, 2 cores): every ORT candidate took about 83 ms back to back and 40-45 ms alone or
# with this pause, and the candidate after the heaviest spinner lost the most.
SETTLE_S = 0.2


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, after one warm-up each; the candidates run
    interleaved (one repeat of each in turn) so machine noise hits them alike, each after
    SETTLE_S of idle so that none runs on the previous one's spinning threads."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: round(1e3 * statistics.median(t), 2) for name, t in times.items()}


class OrtLM:
    """A decoder ONNX file in plain onnxruntime, whichever exporter wrote it: input_ids, past
    key/value inputs (ours: past_key_<n>; genai and optimum: past_key_values.<n>.key), and when
    the graph has them attention_mask [1, P + S] and position_ids [1, S]."""

    def __init__(self, path: Path, threads: int, kv_heads: int, head_dim: int):
        self.path = path
        self.sess = rwonnx.session(path, threads=threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        outputs = [o.name for o in self.sess.get_outputs()]
        self.past = [n for n in self.inputs if "past" in n and n != "past_length"]
        if "past_length" in self.inputs:
            raise ValueError(f"{path}: bounded caches are not benchmarked here")
        self.present = [outputs.index(n.replace("past_key_values", "present")
                                      .replace("past_", "present_")) for n in self.past]
        # (layer, 0 key / 1 value) of each past input, to feed a cache made elsewhere
        # ("past_key_values.3.value" holds "key" too: drop that prefix before looking)
        self.slots = [(int(re.search(r"\d+", n).group()),
                       1 if "value" in n.replace("past_key_values", "") else 0)
                      for n in self.past]
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def empty(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past]

    def from_layers(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [layers[layer][kv] for layer, kv in self.slots]

    def feed(self, ids: np.ndarray, past: list[np.ndarray]) -> dict:
        p, s = past[0].shape[2], ids.shape[1]
        feed = {"input_ids": ids, **dict(zip(self.past, past, strict=True))}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, p + s), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(p, p + s, dtype=np.int64)[None]
        return feed

    def step(self, ids: np.ndarray, past: list[np.ndarray]):
        out = self.sess.run(None, self.feed(ids, past))
        return out[0], [out[j] for j in self.present]

    def generate(self, prompt: np.ndarray, n: int) -> np.ndarray:
        """Greedy: n new tokens, n runs (the first is the prefill), like rwonnx.generate."""
        step, past, new = prompt, self.empty(), []
        for _ in range(n):
            logits, past = self.step(step, past)
            step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            new.append(step)
        return np.concatenate(new, axis=1)


def torch_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache, [1, Hkv, P, D] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def torch_generate(model, prompt: torch.Tensor, n: int) -> np.ndarray:
    """Greedy with the model's own cache: n new tokens, n forwards (the first is the prefill)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        new = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(n - 1):
            out = model(new[-1], past_key_values=out.past_key_values, use_cache=True)
            new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new, dim=1).numpy()


def node_counts(path: Path, threads: int, tmp: str) -> dict:
    """Nodes in the file (main graph, and inside local functions) and after ONNX Runtime's
    ORT_ENABLE_ALL optimizations (the session's optimized_model_filepath, weights to a side
    file), with the most frequent op types."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    row = {"file_nodes": len(model.graph.node),
           "function_nodes": sum(len(f.node) for f in model.functions),
           "file_ops": dict(ops.most_common(8))}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = Path(tmp) / f"optimized-{path.parent.name}-{path.stem}.onnx"
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  out.name + ".data")
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(out), load_external_data=False)
        ops = Counter(n.op_type for n in optimized.graph.node)
        row.update(ort_optimized_nodes=len(optimized.graph.node),
                   ort_optimized_ops=dict(ops.most_common(8)))
    except Exception as exc:  # an optimized model that cannot be saved is a note, not a stop
        row["ort_optimized_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        for f in (out, out.with_name(out.name + ".data")):
            f.unlink(missing_ok=True)
    return row


def peer_file(kind: str, directory: str) -> Path | str:
    """The peer's decoder .onnx, or why it is skipped."""
    d = Path(directory)
    files = sorted(d.glob("*.onnx")) if d.is_dir() else []
    if not files:
        build = "onnxruntime_genai.models.builder" if kind == "genai" else "optimum-cli export onnx"
        return f"no .onnx in {d} (build it with {build}: see this file's docstring)"
    named = [f for f in files if f.name in ("model.onnx", "decoder_model_merged.onnx")]
    return (named or files)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="128,512,2048", help="prefill lengths")
    parser.add_argument("--decode-past", default="512,4096",
                        help="cache lengths for the decode rows ('' for none)")
    parser.add_argument("--gen-prompt", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=32, help="0: no generate row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", default=CANDIDATES)
    parser.add_argument("--genai-model", default=str(PEERS_DIR / "genai-fp32-cpu"))
    parser.add_argument("--optimum-model", default=str(PEERS_DIR / "optimum-fp32"))
    parser.add_argument("--genai-python", default="/work/peers-venv/bin/python",
                        help="a python with onnxruntime_genai, for genai-rt")
    parser.add_argument("--out", default="benchmarks/results/onnx_peers.json")
    opts = parser.parse_args()
    lengths = [int(x) for x in opts.lengths.split(",") if x]
    pasts = [int(x) for x in opts.decode_past.split(",") if x]
    wanted = opts.candidates.split(",")
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated")

    loaded = load(opts.model)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    notes: dict[str, str] = {}
    results: list[dict] = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        results.append(row)

    with tempfile.TemporaryDirectory() as tmp:
        decoders: dict[str, OrtLM] = {}  # candidate -> its decoder
        prefill_only: dict[str, OrtLM] = {}  # ours-<target>-prefill -> prefill graph
        files: dict[str, Path] = {}
        export_s: dict[str, float] = {}
        ours = [c for c in wanted if c.startswith("ours-")]
        if ours:
            prog = loaded.capture(16, batch=1)
            for cand in ours:
                target, last = cand.removeprefix("ours-").removesuffix("-last"), \
                    cand.endswith("-last")
                graphs = [(True, cand)] + ([] if last else [(False, f"{cand}-prefill")])
                for kv_cache, name in graphs:
                    path = Path(tmp) / name / "model.onnx"
                    path.parent.mkdir()
                    t0 = time.perf_counter()
                    prog.export_onnx(path, target=target, kv_cache=kv_cache,
                                     logits="last" if last else "all")
                    export_s[name] = round(time.perf_counter() - t0, 1)
                    files[name] = path
                    lm = OrtLM(path, opts.threads, kv_heads, head_dim)
                    (decoders if kv_cache else prefill_only)[name] = lm
        for cand, directory in (("genai", opts.genai_model), ("optimum", opts.optimum_model)):
            if cand not in wanted:
                continue
            found = peer_file(cand, directory)
            if isinstance(found, str):
                notes[cand] = "skipped: " + found
                print(f"{cand}: {notes[cand]}", flush=True)
                continue
            files[cand] = found
            decoders[cand] = OrtLM(found, opts.threads, kv_heads, head_dim)
        for cand in wanted:
            if cand not in ("torch", "genai", "genai-rt", "optimum") \
                    and not cand.startswith("ours-"):
                notes[cand] = "skipped: unknown candidate"
        use_torch = "torch" in wanted

        for name, path in files.items():
            emit({"mode": "nodes", "candidate": name, "file": str(path),
                  "export_s": export_s.get(name), **node_counts(path, opts.threads, tmp)})

        for n in lengths:
            ids = token_windows(tok, n, 1)
            x = ids.numpy()
            fns, logits = {}, {}
            if use_torch:
                with torch.no_grad():
                    logits["torch"] = model(ids, use_cache=False).logits.numpy()

                def eager(ids=ids):
                    with torch.no_grad():
                        model(ids, use_cache=False)

                fns["torch"] = eager
            for name, lm in {**decoders, **prefill_only}.items():
                feed = lm.feed(x, lm.empty()) if name in decoders else {"input_ids": x}
                logits[name] = lm.sess.run(None, feed)[0]
                fns[name] = lambda lm=lm, feed=feed: lm.sess.run(None, feed)
            ms = median_ms(fns, opts.repeats)
            emit({"mode": "prefill", "seq_len": n, "ms": ms,
                  "max_rel_err_vs_torch": _errors(logits)})

        for p in pasts:
            ids = token_windows(tok, p + 1, 1)
            with torch.no_grad():
                cache = model(ids[:, :-1], use_cache=True).past_key_values
                want = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
            cache.crop(-1)  # back to p cached tokens (a negative count removes that many)
            layers = [(k.numpy().copy(), v.numpy().copy()) for k, v in torch_layers(cache)]
            token = ids[:, -1:]
            fns, logits = {}, {"torch": want.numpy()}
            if use_torch:
                def torch_step(token=token, cache=cache):
                    with torch.no_grad():
                        model(token, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # back to p cached tokens (views: no copy)

                fns["torch"] = torch_step
            for name, lm in decoders.items():
                feed = lm.feed(token.numpy(), lm.from_layers(layers))
                logits[name] = lm.sess.run(None, feed)[0]
                fns[name] = lambda lm=lm, feed=feed: lm.sess.run(None, feed)
            ms = median_ms(fns, opts.repeats * 5)
            emit({"mode": "decode", "past": p, "ms": ms, "max_rel_err_vs_torch": _errors(logits)})
            del cache, layers

        if opts.gen_tokens:
            prompt = token_windows(tok, opts.gen_prompt, 1)
            reference = torch_generate(model, prompt, opts.gen_tokens)[0]
            fns, tokens = {}, {"torch": reference}
            if use_torch:
                fns["torch"] = lambda: torch_generate(model, prompt, opts.gen_tokens)
            for name, lm in decoders.items():
                if name.startswith("ours-"):
                    def gen(sess=lm.sess):
                        return rwonnx.generate(sess, prompt, opts.gen_tokens)[0, -opts.gen_tokens:]
                else:
                    def gen(lm=lm):
                        return lm.generate(prompt.numpy(), opts.gen_tokens)[0]
                tokens[name] = np.asarray(gen())
                fns[name] = gen
            ms = median_ms(fns, opts.repeats)
            if "genai-rt" in wanted:
                got = genai_runtime(opts, prompt[0].tolist(), notes)
                if got is not None:
                    tokens["genai-rt"] = np.asarray(got["tokens"])
                    ms["genai-rt"] = got["ms"]
            agree = {}
            for name, got in tokens.items():
                got = np.pad(got[:len(reference)], (0, max(0, len(reference) - len(got))),
                             constant_values=-1)  # a run that stopped early (EOS) disagrees
                same = got == reference
                agree[name] = {"agree": int(same.sum()), "of": len(reference),
                               "first_diff": None if same.all() else int(np.argmin(same))}
            emit({"mode": "generate", "prompt": opts.gen_prompt, "new_tokens": opts.gen_tokens,
                  "ms": ms, "ms_per_token": {k: round(v / opts.gen_tokens, 2)
                                             for k, v in ms.items()},
                  "token_agreement_vs_torch": agree,
                  "torch_tokens": reference.tolist()})

    doc = {"model": opts.model,
           "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
           "dtype": "float32", "batch": 1, "repeats": opts.repeats,
           "decode_repeats": opts.repeats * 5, "threads": opts.threads,
           "torch_attention": getattr(cfg, "_attn_implementation", None),
           "candidates": wanted, "notes": notes,
           "peer_dirs": {"genai": opts.genai_model, "optimum": opts.optimum_model},
           "versions": _versions(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "results": results}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")


def genai_runtime(opts, prompt: list[int], notes: dict) -> dict | None:
    """genai-rt's tokens and median ms (GENAI_RT in --genai-python), or None with a note."""
    import subprocess

    model_dir = Path(opts.genai_model)
    if not (model_dir / "genai_config.json").is_file():
        notes["genai-rt"] = f"skipped: no genai_config.json in {model_dir}"
        return None
    if not Path(opts.genai_python).is_file():
        notes["genai-rt"] = f"skipped: no python at {opts.genai_python} (--genai-python)"
        return None
    args = {"dir": str(model_dir), "threads": opts.threads, "prompt": prompt,
            "n": opts.gen_tokens, "repeats": opts.repeats}
    proc = subprocess.run([opts.genai_python, "-c", GENAI_RT, json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        notes["genai-rt"] = f"skipped: {opts.genai_python} failed: {tail}"
        return None
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    notes["genai-rt"] = (f"onnxruntime-genai {got['version']} in its own process "
                         "(not interleaved with the others); generate row only")
    return got


def _errors(logits: dict) -> dict[str, float]:
    """max |candidate - torch| / max |torch| over the logits of each candidate (over the rows
    it has: a logits="last" candidate's one row against torch's last)."""
    if "torch" not in logits:
        return {}
    want = logits["torch"]
    scale = float(np.abs(want).max())
    return {name: float(np.abs(got - want[:, -got.shape[1]:]).max() / scale)
            for name, got in logits.items() if name != "torch"}


def _versions() -> dict[str, str | None]:
    """Versions in this environment, and the peers' exporters as their own venvs have them."""
    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai",
                 "optimum", "optimum-onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    for venv in ("/work/peers-venv", "/work/peers-venv-optimum"):
        for site in Path(venv).glob("lib/python*/site-packages"):
            for info in sorted(site.glob("*.dist-info")):
                name, _, version = info.name.removesuffix(".dist-info").partition("-")
                if name.lower().replace("_", "-") in ("onnxruntime", "onnxruntime-genai",
                                                      "optimum", "optimum-onnx",
                                                      "transformers", "torch", "onnx"):
                    out[f"{Path(venv).name}:{name}"] = version
    return out


if __name__ == "__main__":
    main()
