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
D]; outputs logits [batch, sequence, vocab] and present_key_<n>/present_value_<n>. With
``logits="last"`` the logits are the last position's only, [batch, 1, vocab]: all that
``generate`` reads, and the LM head then runs on one row (a faster prefill). With target
"ort", ONNX Runtime's GroupQueryAttention takes several new tokens after a non-empty cache
only at batch 1 (prefill and one-token steps work at any batch).

Encoder-decoders (T5, BART, Whisper; rewriter.seq2seq): ``kv_cache=True`` writes the decoder
step to the path and the encoder beside it (``dec.encoder.onnx``); ``session`` opens both:

    prog.export_onnx("out/dec.onnx", target="ort", kv_cache=True)
    tokens = rwonnx.generate(rwonnx.session("out/dec.onnx"), input_ids, 32, attention_mask=mask)

Left-padded batches: export with ``padded=True`` (the decoder then takes attention_mask
[batch, total_sequence] = [B, P + S] last) and pass the prompt's mask to ``generate``:

    prog.export_onnx("out/decoder.onnx", target="ort", kv_cache=True, padded=True)
    tokens = rwonnx.generate(sess, prompt_ids, 32, attention_mask=prompt_mask)
"""

from __future__ import annotations

import dataclasses
import os

from rewriter.codegen.ort import runtime, seq2seq
from rewriter.codegen.ort.runtime import run
from rewriter.decoder import build_decoder, is_causal_lm
from rewriter.errors import RewriterError
from rewriter.seq2seq import build_seq2seq, is_seq2seq

__all__ = ["LOGITS", "export_onnx", "generate", "resolve_kv_cache", "run", "session"]

LOGITS = ("all", "last")  # export_onnx(..., logits=): every position's, or the last one's


def export_onnx(program, path: str | os.PathLike, target: str = "onnx", *,
                kv_cache: bool | str = False, padded: bool = False, logits: str = "all",
                **options) -> list[dict]:
    """Export ``program`` to ``path`` (see rewriter.codegen.onnx.export.export_program);
    ``kv_cache``: as a decoder step with past/present key-value inputs and outputs (built and
    checked by rewriter.decoder.build_decoder, then export_decoder; an encoder-decoder by
    rewriter.seq2seq, its encoder written beside, ``<stem>.encoder.onnx``); ``padded`` (with
    ``kv_cache``): one more input, attention_mask [B, P + S], for left-padded batches.
    ``kv_cache="auto"`` (the CLI's default): the decoder step for causal LMs, which serves
    prefill with an empty past, so one graph does both (resolve_kv_cache). ``logits``
    (with ``kv_cache``): "all" [B, S, V], or "last" [B, 1, V], the last position's only,
    which is all generation reads (Decoder.last_logits_only: the LM head runs on one row)."""
    from rewriter.codegen.onnx.export import (  # imports onnx
        export_decoder,
        export_program,
        export_seq2seq,
    )

    kv_cache = resolve_kv_cache(program, kv_cache)
    if padded and not kv_cache:
        raise RewriterError("padded=True is for decoders: export with kv_cache=True")
    if logits not in LOGITS:
        raise RewriterError(f"logits={logits!r}: give one of {', '.join(LOGITS)}")
    last = logits == "last"
    if last and not kv_cache:
        raise RewriterError("logits='last' is for decoders: export with kv_cache=True")
    if kv_cache and is_seq2seq(program):
        if padded:
            raise RewriterError("padded=True is for causal LMs: an encoder-decoder takes the "
                                "encoder's attention_mask in generate()")
        s2s = build_seq2seq(program)
        if last:
            s2s = dataclasses.replace(s2s, decoder=s2s.decoder.last_logits_only())
        return export_seq2seq(s2s, path, target, **options)
    if kv_cache:
        decoder = build_decoder(program, padded=padded)
        return export_decoder(decoder.last_logits_only() if last else decoder, path, target,
                              **options)
    return export_program(program, path, target, **options)


def resolve_kv_cache(program, kv_cache: bool | str) -> bool:
    """``kv_cache`` as a bool: "auto" is True for a causal LM (rewriter.decoder.is_causal_lm)
    and False for encoders and encoder-decoders (their prefill graph)."""
    if kv_cache == "auto":
        return not is_seq2seq(program) and is_causal_lm(program)
    if not isinstance(kv_cache, bool):
        raise RewriterError(f"kv_cache={kv_cache!r}: give True, False or 'auto'")
    return kv_cache


def session(path: str | os.PathLike, *, threads: int | None = None,
            providers: list[str] | None = None):
    """An onnxruntime.InferenceSession (rewriter.codegen.ort.runtime.session), or for an
    encoder-decoder's step a Seq2SeqSession holding its encoder's session too."""
    decoder = runtime.session(path, threads=threads, providers=providers)
    both = seq2seq.open_seq2seq(decoder, path, lambda p: runtime.session(
        p, threads=threads, providers=providers))
    return decoder if both is None else both


def generate(sess, input_ids, max_new_tokens: int, attention_mask=None):
    """Greedy decoding with an exported decoder (rewriter.codegen.ort.runtime.generate): the
    prompt [B, S] and ``max_new_tokens`` more. For an encoder-decoder (a Seq2SeqSession),
    ``input_ids`` is the encoder's input and ``attention_mask`` its mask; the result is the
    decoder's tokens [B, 1 + max_new_tokens] (rewriter.codegen.ort.seq2seq.generate)."""
    if isinstance(sess, seq2seq.Seq2SeqSession):
        return seq2seq.generate(sess, input_ids, max_new_tokens, attention_mask)
    return runtime.generate(sess, input_ids, max_new_tokens, attention_mask)
