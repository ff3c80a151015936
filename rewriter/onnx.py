"""ONNX export and ONNX Runtime sessions for rewritten programs.

    import rewriter as rw
    from rewriter import onnx as rwonnx

    prog.export_onnx("out/model.onnx", target="ort")    # or rwonnx.export_onnx(prog, ...)
    sess = rwonnx.session("out/model.onnx")
    logits, = rwonnx.run(sess, input_ids, attention_mask=mask)

Targets: "onnx" (standard ops, opset 23: runs anywhere) and "ort" (com.microsoft
GroupQueryAttention / MultiHeadAttention where they express the site). Which op each site
became, and why, is returned and written to ``<path>.json``.

Decoders with a KV cache (causal LMs; see rewriter.decoder):

    prog.export_onnx("out/decoder.onnx", target="ort", kv_cache=True)
    sess = rwonnx.session("out/decoder.onnx")
    tokens = rwonnx.generate(sess, prompt_ids, max_new_tokens=32)      # greedy

Weights over 1.5 GiB (or any, with ``external_data=True``) go to ``<path>.data`` beside the
model (protobuf's 2 GiB limit). The export keeps the program's dtype: float16 runs in ONNX
Runtime's CPU provider; bfloat16 is valid ONNX, but that provider has no bfloat16 kernels and
`session` says so in one line (export a float16 or float32 program instead).

Inputs input_ids [batch, sequence], past_key_<n>/past_value_<n> [batch, Hkv, past_sequence,
D]; outputs logits and present_key_<n>/present_value_<n>. With target "ort", ONNX Runtime's
GroupQueryAttention takes several new tokens after a non-empty cache only at batch 1
(prefill and one-token steps work at any batch).

Left-padded batches: export with ``padded=True`` (the decoder then takes attention_mask
[batch, total_sequence] = [B, P + S] last) and pass the prompt's mask to ``generate``:

    prog.export_onnx("out/decoder.onnx", target="ort", kv_cache=True, padded=True)
    tokens = rwonnx.generate(sess, prompt_ids, 32, attention_mask=prompt_mask)
"""

from __future__ import annotations

import os

from rewriter.codegen.ort.runtime import generate, run, session
from rewriter.decoder import build_decoder
from rewriter.errors import RewriterError

__all__ = ["export_onnx", "generate", "run", "session"]


def export_onnx(program, path: str | os.PathLike, target: str = "onnx", *,
                kv_cache: bool = False, padded: bool = False, **options) -> list[dict]:
    """Export ``program`` to ``path`` (see rewriter.codegen.onnx.export.export_program);
    ``kv_cache``: as a decoder step with past/present key-value inputs and outputs (built and
    checked by rewriter.decoder.build_decoder, then export_decoder); ``padded`` (with
    ``kv_cache``): one more input, attention_mask [B, P + S], for left-padded batches."""
    from rewriter.codegen.onnx.export import export_decoder, export_program  # imports onnx

    if padded and not kv_cache:
        raise RewriterError("padded=True is for decoders: export with kv_cache=True")
    if kv_cache:
        return export_decoder(build_decoder(program, padded=padded), path, target, **options)
    return export_program(program, path, target, **options)
