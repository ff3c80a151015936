"""`Program`: the public face of a captured model: verify, rewrite results, compile, save,
export, decode, summarize. The state lives in `rewriter.ir.program.GraphProgram`."""

from __future__ import annotations

import io
from typing import Any

import torch

from rewriter.analysis.accounting import program_accounting
from rewriter.analysis.render import sites_table
from rewriter.analysis.verify import VerifyReport, compare_outputs
from rewriter.checkpoint import save_program
from rewriter.codegen import compile_program
from rewriter.decoder import DecoderError, build_decoder
from rewriter.ir.precision import EXACT_TOLERANCE, float64_module, to_float64
from rewriter.ir.program import GraphProgram
from rewriter.onnx import export_onnx
from rewriter.seq2seq import build_seq2seq, is_seq2seq


class Program(GraphProgram):
    """A captured model. ``module`` runs with the model's call signature; rewrites return a new
    Program and never mutate this one."""

    def verify(self, original: Any = None, args: tuple | None = None,
               kwargs: dict | None = None, tolerance: float | None = None, *,
               float64: bool = False) -> VerifyReport:
        """Run this program and ``original`` (a Program, an nn.Module, or by default the graph
        captured before canonicalization) on the same inputs and compare every output.

        ``float64``: both sides run in float64 (rewriter.ir.precision), where rounding is ~1e-15
        whatever the CPU, so a mismatch means the graphs compute different things; the default
        tolerance is then ``EXACT_TOLERANCE`` instead of 1e-5."""
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None and args is self.example_args \
            else (kwargs or {})
        if not isinstance(args, tuple):
            args = (args,)
        reference = self.original if original is None else original
        if isinstance(reference, Program):
            reference = reference.module
        module = self.module
        if float64:
            shared: dict = {}  # tensors both sides read are converted once
            module = float64_module(module, shared)
            reference = float64_module(reference, shared)
            args, kwargs = to_float64((args, kwargs))
        if tolerance is None:
            tolerance = EXACT_TOLERANCE if float64 else 1e-5
        with torch.no_grad():
            got = module(*args, **kwargs)
            want = reference(*args, **kwargs)
        return compare_outputs(got, want, tolerance, "float64" if float64 else "")

    def compile(self, backend: str = "triton") -> Program:
        """A new Program whose canonical nodes run on ``backend`` ("triton": generated kernels,
        inference-only; sites it cannot serve stay eager, the reason in their notes)."""
        return compile_program(self, backend)

    def export_onnx(self, path, target: str = "onnx", *, kv_cache: bool = False,
                    external_data: bool | None = None, padded: bool = False,
                    logits: str = "all") -> list[dict]:
        """Write this program as ONNX (target "onnx": standard ops; "ort": ONNX Runtime contrib
        ops where they fit); returns which op each site became (see rewriter.onnx).
        ``kv_cache``: a decoder step with past/present key-value inputs and outputs.
        ``external_data``: weights in ``<path>.data`` (default: when over 1.5 GiB).
        ``padded``: the decoder takes attention_mask [B, P + S] (left-padded batches).
        ``logits``: "all" [B, S, V], or "last" [B, 1, V] (with ``kv_cache``: what generation
        reads; the LM head runs on one row)."""
        return export_onnx(self, path, target, kv_cache=kv_cache, external_data=external_data,
                           logits=logits, **({"padded": True} if padded else {}))

    def decoder(self, *, bounded: bool = True, padded: bool = False):
        """This causal LM as a step function over a KV cache (rewriter.decoder.Decoder),
        checked against the program before it is returned. Sink + window heads keep a bounded
        cache unless ``bounded=False``; ``decoder.cache_report()`` gives the bytes.
        ``padded``: an attention_mask input for left-padded batches (``generate(...,
        attention_mask=...)`` builds such a decoder by itself when a batch has pads).
        An encoder-decoder (captured with ``decoder_input_ids``) gives a
        rewriter.seq2seq.Seq2Seq: an encoder and a cached decoder step, with the same
        ``generate(inputs, max_new_tokens, attention_mask=None)``."""
        if is_seq2seq(self):
            if padded:
                raise DecoderError("padded=True is for causal LMs: an encoder-decoder's "
                                   "decoder starts every row at its start token, and the "
                                   "encoder's padding goes in generate(attention_mask=...)")
            return build_seq2seq(self, bounded=bounded)
        return build_decoder(self, bounded=bounded, padded=padded)

    def save(self, path, *, force: bool = False, verification: VerifyReport | None = None,
             onnx: str | None = None) -> dict:
        """Write program.pt2 + manifest.json (+ hf/ where a transformers config expresses the
        result, + model.onnx for the ``onnx`` target) into the directory ``path``,
        atomically. Returns the manifest."""
        return save_program(self, path, force=force, verification=verification, onnx=onnx)

    def accounting(self, ctx: int = 1024) -> dict:
        """Attention density and FLOPs at ``ctx`` tokens, KV-cache bytes per token (bf16)."""
        return program_accounting(self.sites, ctx)

    def summary(self, width: int = 160) -> str:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=width, record=True)
        console.print(sites_table(self.sites))
        acc = self.accounting(1024)
        grids = any(r["ctx"] != 1024 for r in acc["sites"])  # neighbourhoods: their own length
        console.print(f"{len(self.sites)} sites, {self.parameter_count():,} parameters, "
                      f"KV cache {acc['kv_cache_bytes_per_token']:,} B/token (bf16)"
                      + (f" ({acc['kv_cache_bytes_at_ctx']:,} B at 1024 tokens, bounded)"
                         if acc["kv_cache_bytes_at_ctx"] < 1024 * acc["kv_cache_bytes_per_token"]
                         else "") + ", attention "
                      f"density {acc['attention_density']:.3f} and "
                      f"{acc['attention_flops'] / 1e9:.2f} GFLOP at 1024 tokens"
                      + (" (grid sites at their grid's tokens)" if grids else ""))
        return console.export_text()

    def __repr__(self) -> str:
        return f"Program({len(self.sites)} attention sites, " \
               f"{self.parameter_count():,} parameters)"


