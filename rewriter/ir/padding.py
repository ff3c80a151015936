"""Padded batches in decoders: the two ops a decoder built with ``padded=True`` adds.

Prompts of different lengths share a batch by left padding (Hugging Face's convention): the
decoder takes ``attention_mask`` [B, P + S] (1 real token, 0 pad; over the cache and the S new
tokens) beside the token ids and the cache.

    padded_cached_attention(q, k, v, past_key, past_value, attention_mask, ...)
        cached_attention with pad keys masked out: query i (position P + i) sees key j when
        j <= P + i and attention_mask[b, j] == 1, or j == P + i (a pad query sees itself, so
        no row is empty and no NaN reaches the cache)
    padding_positions(attention_mask, input_ids) -> [B, S] int64
        the new tokens' positions: cumsum(attention_mask, 1) - 1, last S columns (pads: -1),
        as transformers' generate() derives position_ids from the mask

The mask's length is not tied to P + S in the graph (only these ops read it), so an export
may give it its own dynamic axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rewriter.errors import RewriterError
from rewriter.ir.masks import causal_mask
from rewriter.ir.ops import _check_shapes, attention

__all__ = ["AttentionMaskError", "check_attention_mask", "padded_cached_attention",
           "padded_keep", "padding_positions"]


def padded_keep(attention_mask: Tensor, new: int) -> Tensor:
    """[B, 1, S, T] bool: bottom-right causal over T = attention_mask.shape[1] keys, pad keys
    masked, each query always seeing its own key."""
    total = attention_mask.shape[1]
    causal = causal_mask(new, total).to(attention_mask.device)  # [S, T]
    own = torch.arange(total, device=attention_mask.device).view(1, total) == (
        torch.arange(new, device=attention_mask.device).view(new, 1) + (total - new))
    real = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    return causal & (real | own)


@torch.library.custom_op("rewriter::padded_cached_attention", mutates_args=())
def padded_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    attention_mask: Tensor,
    *,
    scale: float,
    sparsity: str = "",
    softcap: float = 0.0,
    alibi: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``rewriter::cached_attention`` over a left-padded batch (see the module docstring):
    attention_mask [B, P + S] int or bool. ``sparsity`` must not depend on absolute positions
    (no sinks, no top-k; the decoder checks): it is applied on cache indices, which differ from
    a row's positions by its pad count. ALiBi is exact: its bias shifts by a constant per row."""
    present_key = torch.cat([past_key, k], dim=2)
    present_value = torch.cat([past_value, v], dim=2)
    total = present_key.shape[2]
    torch._check(attention_mask.dim() == 2 and attention_mask.shape[1] == total,
                 lambda: f"attention_mask {tuple(attention_mask.shape)} must be [B, past + "
                         f"new] = [B, {total}]")
    keep = padded_keep(attention_mask, q.shape[2])
    extra = {"alibi": list(alibi)} if alibi else {}
    out = attention(q, present_key, present_value, keep, scale=scale, sparsity=sparsity,
                    softcap=softcap, **extra)
    return out, present_key, present_value


@padded_cached_attention.register_fake
def _padded_cached_attention_fake(q, k, v, past_key, past_value, attention_mask, *, scale,
                                  sparsity="", softcap=0.0, alibi=None):
    _check_shapes(q, k, v)
    present_key = past_key.new_empty((*k.shape[:2], past_key.shape[2] + k.shape[2], k.shape[3]))
    present_value = past_value.new_empty(
        (*v.shape[:2], past_value.shape[2] + v.shape[2], v.shape[3]))
    return q.new_empty((*q.shape[:-1], v.shape[-1])), present_key, present_value


@torch.library.custom_op("rewriter::padding_positions", mutates_args=())
def padding_positions(attention_mask: Tensor, input_ids: Tensor) -> Tensor:
    """[B, S] int64: cumsum(attention_mask, 1) - 1 over the last S = input_ids.shape[1]
    columns (a left pad gets -1)."""
    new = input_ids.shape[1]
    pos = attention_mask.long().cumsum(1) - 1
    return pos[:, pos.shape[1] - new:].clone()


@padding_positions.register_fake
def _padding_positions_fake(attention_mask, input_ids):
    return input_ids.new_empty(input_ids.shape, dtype=torch.long)


class AttentionMaskError(RewriterError, ValueError):
    """An attention_mask a padded decoder cannot take (shape, values, right padding)."""


def check_attention_mask(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``attention_mask`` [B, S] for the prompt ``input_ids`` [B, S] as int64, after checking
    it is 0/1, left-padded (each row's zeros before its ones) and keeps a token in every row;
    raises AttentionMaskError (one line) otherwise."""
    mask = torch.as_tensor(attention_mask)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise AttentionMaskError(f"attention_mask has shape {tuple(mask.shape)}; it must match "
                                 f"input_ids {tuple(input_ids.shape)} ([batch, prompt length])")
    if mask.is_floating_point() or mask.is_complex():
        raise AttentionMaskError(f"attention_mask has dtype {mask.dtype}: give 0/1 integers or "
                                 "bools")
    mask = mask.long()
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise AttentionMaskError("attention_mask must hold only 0 (pad) and 1 (token)")
    if mask.shape[1] and bool((mask[:, 1:] < mask[:, :-1]).any()):
        row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
        raise AttentionMaskError(f"attention_mask row {row} has a pad after a token: prompts "
                                 "must be left-padded (pads first, as tokenizer "
                                 "padding_side='left' gives)")
    if mask.shape[1] and not bool(mask[:, -1].all()):
        row = int((mask[:, -1] == 0).nonzero()[0])
        raise AttentionMaskError(f"attention_mask row {row} has no token: every prompt needs "
                                 "at least one")
    return mask
