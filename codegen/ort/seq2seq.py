"""ONNX Runtime for an exported encoder-decoder (rewriter.codegen.onnx.export.export_seq2seq):
the decoder step's metadata names its encoder file, `Seq2SeqSession` holds both sessions, and
`generate` runs the encoder once, then greedy decoder steps over its context."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rewriter.codegen.ort.runtime import _numpy, empty_past
from rewriter.errors import RewriterError

__all__ = ["Seq2SeqSession", "generate", "open_seq2seq"]

ENCODER_KEY = "rewriter.encoder"


@dataclass
class Seq2SeqSession:
    """The encoder's and the decoder step's sessions."""

    encoder: object  # onnxruntime.InferenceSession
    decoder: object
    start_token: int | None

    def get_inputs(self):  # the decoder step's, as for a decoder-only session
        return self.decoder.get_inputs()

    def get_outputs(self):
        return self.decoder.get_outputs()


def open_seq2seq(decoder, path: str | os.PathLike, open_session) -> Seq2SeqSession | None:
    """A Seq2SeqSession when ``decoder`` (the session of ``path``) is an encoder-decoder's
    step (its metadata names an encoder), else None. ``open_session(path)`` opens the
    encoder with the decoder's options."""
    meta = decoder.get_modelmeta().custom_metadata_map
    if ENCODER_KEY not in meta:
        return None
    encoder_file = Path(path).parent / meta[ENCODER_KEY]
    if not encoder_file.is_file():
        raise RewriterError(f"{path}: its encoder {encoder_file} is missing (an "
                            "encoder-decoder is exported as two files; keep them together)")
    start = meta.get("rewriter.decoder_start_token_id")
    return Seq2SeqSession(open_session(encoder_file), decoder,
                          None if start is None else int(start))


def generate(sess: Seq2SeqSession, inputs: torch.Tensor, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None, *,
             decoder_start_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding: ``inputs`` (token ids [B, Ssrc] or features) through the encoder once,
    then ``max_new_tokens`` decoder steps from the start token, each feeding back the
    present cache. Returns [B, 1 + max_new_tokens] decoder token ids."""
    start = sess.start_token if decoder_start_token_id is None else decoder_start_token_id
    if start is None:
        raise RewriterError("no decoder_start_token_id in the model's metadata: pass "
                            "decoder_start_token_id=")
    names = [i.name for i in sess.encoder.get_inputs()]
    feed = {names[0]: _numpy(inputs)}
    if len(names) > 1:
        mask = np.ones(inputs.shape[:2], dtype=np.int64) if attention_mask is None \
            else _numpy(attention_mask).astype(np.int64)
        feed[names[1]] = mask
    elif attention_mask is not None:
        raise RewriterError(f"this encoder takes no attention mask (inputs: {names})")
    context_names = [o.name for o in sess.encoder.get_outputs()]
    context = dict(zip(context_names, sess.encoder.run(None, feed), strict=True))
    step_inputs = sess.decoder.get_inputs()
    outputs = [o.name for o in sess.decoder.get_outputs()]
    pasts = [i for i in step_inputs if i.name.startswith("past_")]
    batch = inputs.shape[0]
    past = dict(zip([i.name for i in pasts], empty_past(pasts, batch), strict=True))
    token = np.full((batch, 1), start, dtype=np.int64)
    out = [token]
    for _ in range(max_new_tokens):
        results = dict(zip(outputs, sess.decoder.run(None, {"input_ids": token, **past,
                                                             **context}), strict=True))
        token = results["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(token)
        past = {name: results[name.replace("past_", "present_", 1)] for name in past}
    return torch.from_numpy(np.concatenate(out, axis=1))
