"""Triton backend: generated flash-attention kernels for ``rewriter::attention``.

Each canonical node's variant (head dims, GQA ratio, dtype, is_causal, softcap, attn_mask kind,
window / sink / dilation / per-head windows, or a grid neighbourhood) gets its own kernel
source, generated from a template (`template`), cached as a readable file by key (`cache`)
and launched by `launch`.
``torch.ops.rewriter.attention_triton`` (`op`) is what compiled graphs call. Forward only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from rewriter.codegen.backend import compile_program, register_backend
from rewriter.codegen.triton import cache
from rewriter.codegen.triton.op import attention_triton
from rewriter.codegen.triton.spec import KernelSpec
from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec
from rewriter.ir.topk import TopKSpec, is_topk

__all__ = ["BACKEND", "KernelSpec", "TritonBackend", "attention_triton", "triton_attention"]


def triton_attention(q, k, v, attn_mask=None, *, scale, is_causal=False, sparsity="",
                     softcap=0.0, alibi=None, **tiles):
    """Run the generated kernel directly (raises SpecError where it cannot serve the call)."""
    from rewriter.codegen.triton.launch import triton_attention as run

    return run(q, k, v, attn_mask, scale=scale, is_causal=is_causal, sparsity=sparsity,
               softcap=softcap, alibi=alibi, **tiles)


class TritonBackend:
    """Generated kernels (the contract: rewriter.codegen.backend)."""

    name = "triton"
    summary = "generated Triton flash-attention kernels, one per variant (GPU; forward only)"
    op = torch.ops.rewriter.attention_triton.default

    def available(self) -> tuple[bool, str]:
        """Triton importable and a CUDA device, or TRITON_INTERPRET=1."""
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "TRITON_INTERPRET=1 (interpreter: slow, for testing)"
        if torch.cuda.is_available():
            return True, f"CUDA device {torch.cuda.get_device_name()}"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"

    def kernel_spec(self, site, *, dtype=None, mask: str = "none", sparsity: str | None = None,
                    is_causal: bool | None = None, softcap: float | None = None) -> KernelSpec:
        """The specialization a site needs (keywords: what the graph says about the call, where
        known); raises SpecError with the reason the generator cannot serve it."""
        sparsity = site.sparsity if sparsity is None else sparsity
        if site.num_kv_heads < 1 or site.num_heads % site.num_kv_heads:
            raise SpecError(f"{site.num_heads} query heads over {site.num_kv_heads} KV heads")
        spec = MaskSpec.parse(sparsity)
        if spec.heads is not None:
            spec.head_windows(site.num_heads)  # the table has one entry per query head
        return KernelSpec.create(head_dim=site.head_dim, v_head_dim=site.v_head_dim,
                                 group=site.num_heads // site.num_kv_heads,
                                 dtype=dtype or torch.float32,
                                 causal=site.is_causal if is_causal is None else is_causal,
                                 softcap=site.softcap if softcap is None else softcap,
                                 mask=mask, sparsity=sparsity, alibi=bool(site.alibi))

    def topk_spec(self, site, *, dtype=None, mask: str = "none", sparsity: str | None = None,
                  softcap: float | None = None, **_) -> TopKSpec:
        """A top-k site's selection spec, checked against what its kernel serves."""
        from rewriter.codegen.triton.topk import check

        spec = TopKSpec.parse(site.sparsity if sparsity is None else sparsity)
        if site.alibi:
            raise SpecError("topk with ALiBi: the top-k kernel has no position bias")
        check(spec, dtype=dtype or torch.float32, head_dim=site.head_dim,
              v_head_dim=site.v_head_dim, mask=mask,
              softcap=site.softcap if softcap is None else softcap)
        return spec

    def supports(self, site, **call) -> tuple[bool, str]:
        """(ok, reason) for an AttentionSite (call: dtype=, mask= from the graph, if known)."""
        if site.dropout > 0:
            return False, f"attention dropout {site.dropout:g} (the kernel has none)"
        try:
            if is_topk(call.get("sparsity") or site.sparsity):
                self.topk_spec(site, **call)
            else:
                self.kernel_spec(site, **call)
        except SpecError as exc:
            return False, str(exc)
        return True, ""

    def lower_site(self, site, **call) -> dict:
        """Write (or find) the site's kernel source; the record names it."""
        if is_topk(call.get("sparsity") or site.sparsity):
            spec = self.topk_spec(site, **call)
            return {"kernel": f"topk_attn_fwd (block {spec.block})", "key": None,
                    "inference_only": True}
        spec = self.kernel_spec(site, **call)
        cache.emit(spec)
        return {"kernel": spec.name, "key": spec.key, "inference_only": True}

    def runner(self, program, workdir: Path):  # noqa: ARG002  (kernels live in the cache)
        return compile_program(program, self.name).module


BACKEND = register_backend(TritonBackend())
