"""``torch.ops.rewriter.attention_triton``: the canonical op's contract, run by a generated kernel.

Same signature and semantics as ``rewriter::attention`` (see rewriter.ir.ops). Registered with a
fake implementation, so a compiled graph stays traceable and exportable. Forward only:
autograd through it raises (compile for inference; train on the eager program).

At run time it defers to the eager op where no kernel can run: tensors on a device Triton
cannot reach (CPU without TRITON_INTERPRET=1) or a call the generator does not serve.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.errors import SpecError


def can_run_on(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("rewriter::attention_triton", mutates_args=())
def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> Tensor:
    """rewriter::attention through a generated Triton kernel (eager where none can run)."""
    attrs = {"scale": scale, "is_causal": is_causal, "sparsity": sparsity, "softcap": softcap}
    if alibi:
        attrs["alibi"] = [float(a) for a in alibi]
    if can_run_on(q):
        from rewriter.codegen.triton.launch import triton_attention

        try:
            return triton_attention(q, k, v, attn_mask, **attrs)
        except SpecError:
            pass  # e.g. a dtype the generator does not serve: the eager op is exact
    return torch.ops.rewriter.attention(q, k, v, attn_mask, **attrs)


@attention_triton.register_fake
def _fake(q, k, v, attn_mask=None, *, scale, is_causal=False, sparsity="", softcap=0.0,
          alibi=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _no_backward(ctx, grad):
    raise RuntimeError("rewriter::attention_triton is inference-only (forward kernel); "
                       "run training on the eager program instead of Program.compile()")


attention_triton.register_autograd(_no_backward)
