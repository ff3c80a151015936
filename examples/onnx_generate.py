"""Export a causal LM (optionally rewritten) for ONNX Runtime as a decoder step with a KV
cache, generate greedily with ONNX Runtime and check the tokens against the PyTorch decoder.

    .venv/bin/python examples/onnx_generate.py [--model smollm2-135m] [--tokens 24]
        [--variant gqa:kv-heads=1] [--target ort|onnx] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import rewriter as rw
from rewriter import onnx as rwonnx


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, HF dir or .gguf")
    parser.add_argument("--variant", action="append", default=[], help="spec, repeatable")
    parser.add_argument("--target", choices=["ort", "onnx"], default="ort")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens to generate")
    parser.add_argument("--prompt", default="The Python interpreter reads a program")
    parser.add_argument("--out", type=Path, help="keep the .onnx file here")
    a = parser.parse_args(argv)

    loaded = rw.load_model(a.model)
    prog = loaded.capture(seq_len=16)
    if a.variant:
        prog = rw.rewrite(prog, a.variant)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    tmp = tempfile.TemporaryDirectory(prefix="onnx-generate-")  # removed at the end
    path = a.out or Path(tmp.name) / "decoder.onnx"
    rows = prog.export_onnx(path, target=a.target, kv_cache=True)  # which op each site became
    ops = sorted({row["op"] for row in rows})
    print(f"{a.model}{' -> ' + ' + '.join(a.variant) if a.variant else ''}: wrote {path} "
          f"({len(rows)} sites as {', '.join(ops)}, {path.stat().st_size / 1e6:.1f} MB)")

    prompt = loaded.tokenizer(a.prompt, return_tensors="pt").input_ids    # [1, S]
    decoder = prog.decoder()             # the same step function in PyTorch, checked on build
    start = time.perf_counter()
    with_torch = decoder.generate(prompt, a.tokens)                        # greedy, KV cache
    mid = time.perf_counter()
    with_ort = rwonnx.generate(rwonnx.session(str(path)), prompt, a.tokens)
    end = time.perf_counter()

    same = with_ort.tolist() == with_torch.tolist()
    new = slice(prompt.shape[1], None)
    print(f"prompt  {a.prompt!r} ({prompt.shape[1]} tokens)")
    print(f"torch   {loaded.tokenizer.decode(with_torch[0, new])!r} ({mid - start:.1f} s)")
    print(f"ORT     {loaded.tokenizer.decode(with_ort[0, new])!r} ({end - mid:.1f} s)")
    print(f"{a.tokens} greedy tokens: ONNX Runtime {'==' if same else '!='} PyTorch"
          + ("" if same else f" (first difference at new token "
             f"{(with_ort[0] != with_torch[0]).nonzero()[0].item() - prompt.shape[1]})"))
    tmp.cleanup()
    return {"path": path, "ops": ops, "same": same, "torch_tokens": with_torch,
            "ort_tokens": with_ort}


if __name__ == "__main__":
    main()
