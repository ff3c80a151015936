"""Convert a Hugging Face model directory with variant specs, save the result, reload it with
``rw.load`` and show what changed (parameters, KV heads, KV-cache bytes).

    .venv/bin/python examples/convert_hf_directory.py [--model HF_DIR] [--out DIR]
        [--variant gqa:kv-heads=1 --variant sparse:window=64,sink=4]

Without ``--model`` it converts a tiny random-weight Llama (with a small BPE tokenizer trained
on Python's own docs) that it writes to a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import rewriter as rw


def make_tiny_llama(directory: Path) -> Path:
    """A 2-layer Llama (4 heads, 2 KV heads) saved like any HF checkpoint, with a tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = list(pydoc_data.topics.topics.values())
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>"],
                                                      show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF directory (or zoo name); default: a tiny Llama")
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    parser.add_argument("--variant", action="append", help="spec, repeatable "
                        "(default: gqa:kv-heads=1)")
    a = parser.parse_args(argv)
    specs = a.variant or ["gqa:kv-heads=1"]
    source = tempfile.TemporaryDirectory(prefix="tiny-llama-")  # removed at the end
    model = a.model or str(make_tiny_llama(Path(source.name)))
    out = a.out or Path(tempfile.mkdtemp(prefix="converted-"))  # save() takes an empty dir

    loaded = rw.load_model(model)                # config.json + safetensors + tokenizer
    prog = loaded.capture(seq_len=16)            # keeps the tokenizer for calibration
    new = rw.rewrite(prog, specs)                # calibrated passes read pydoc text by default
    manifest = new.save(out)                     # program.pt2, manifest.json (+ hf/)
    again = rw.load(out)                         # the saved Program, no model code needed
    same = again.verify(new)                     # reloaded vs in-memory, same inputs

    kv = [sorted({s.num_kv_heads for s in p.sites}) for p in (prog, again)]
    before, after = prog.parameter_count(), again.parameter_count()
    print(f"{a.model or 'a tiny random Llama'} -> {' + '.join(specs)}")
    print(f"  sites       {len(prog.sites)} -> {len(again.sites)}")
    print(f"  KV heads    {kv[0]} -> {kv[1]} (query heads {prog.sites[0].num_heads})")
    print(f"  parameters  {before:,} -> {after:,} ({(after - before) / before:+.1%})")
    print(f"  KV cache    {prog.accounting()['kv_cache_bytes_per_token']:,} -> "
          f"{manifest['kv_cache_bytes_per_token']:,} bytes/token (bf16)")
    print(f"  error       {new.verify(prog).max_rel:.3g} max relative vs the source")
    hf = out / "hf" / "config.json"           # a transformers checkpoint, when expressible
    hf_kv = json.loads(hf.read_text())["num_key_value_heads"] if hf.exists() else None
    print("  hf/         " + (f"written, num_key_value_heads={hf_kv}" if hf.exists()
                             else f"not written: {manifest['hf']['reason']}"))
    print(f"  reloaded    {same}")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    source.cleanup()
    return {"out": out, "kv_heads": kv, "parameters": [before, after],
            "reload_error": same.max_rel, "hf_kv_heads": hf_kv}


if __name__ == "__main__":
    main()
