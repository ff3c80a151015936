"""Quality measures for variants: perplexity on held-out text, embedding similarity.

Calibration reads the first tokens of the text (rewriter.io.text.token_windows, offset 0);
evaluation windows start at ``EVAL_OFFSET`` tokens, so the two never overlap."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_leaves

from rewriter.errors import RewriterError
from rewriter.io.text import token_windows

EVAL_OFFSET = 40_000  # tokens; calibration uses far fewer than this


def eval_windows(tokenizer, ctx: int, count: int, text: str | None = None) -> torch.Tensor:
    """[count, ctx] consecutive held-out windows."""
    return token_windows(tokenizer, ctx, count, text=text, offset=0 if text else EVAL_OFFSET)


def held_out_windows(tokenizer, ctx: int, count: int, text: str | None = None) -> torch.Tensor:
    """`eval_windows`, with a one-line RewriterError when the text is too short for them."""
    try:
        return eval_windows(tokenizer, ctx, count, text=text)
    except ValueError as exc:
        raise RewriterError(f"not enough text for {count} windows of {ctx} tokens: "
                            f"{exc}") from None


def logits_fn(program, module: Callable | None = None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B, S] -> logits [B, S, V] through a Program (or anything with call_with_tokens),
    run by its own module or by ``module``: anything with the program's call convention (the
    same graph in another precision, a backend's `rewriter.codegen.runner`) that returns an
    output with ``logits``, the logits tensor, or a sequence whose first element they are."""
    module = program.module if module is None else module

    def run(ids: torch.Tensor) -> torch.Tensor:
        args, kwargs = program.call_with_tokens(ids)
        out = module(*args, **kwargs)
        if isinstance(out, torch.Tensor):  # a module returning the logits themselves
            return out
        return out.logits if hasattr(out, "logits") else out[0]

    return run


def is_language_model(program) -> bool:
    """Whether the program takes token ids and returns next-token logits (an output with a
    ``logits`` field), tried on the first tokens of its example inputs."""
    ids = next((t for t in tree_leaves((program.example_args, program.example_kwargs))
                if isinstance(t, torch.Tensor) and not t.is_floating_point()
                and t.dim() == 2), None)
    if ids is None:
        return False
    try:
        args, kwargs = program.call_with_tokens(ids[:, :8])
        with torch.no_grad():
            out = program.module(*args, **kwargs)
    except Exception:  # inputs it cannot be called with: not a plain token-ids model
        return False
    return hasattr(out, "logits")


def perplexity(fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
               progress: Callable[[int, int], None] | None = None) -> float:
    """exp(mean next-token NLL) over all windows, one window per forward."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, ids in enumerate(windows):
            logits = fn(ids[None])[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
            total += float(nll)
            count += ids.numel() - 1
            if progress:
                progress(i + 1, len(windows))
    return math.exp(total / count)


def perplexity_change(before, after, ctx: int, windows: int, text: str | None = None) -> dict:
    """Perplexity of two programs (a conversion's before and after) on the same ``windows``
    windows of ``ctx`` tokens, read with ``before``'s tokenizer from ``text`` or the held-out
    default: what a converted checkpoint's manifest records as ``quality``."""
    ids = held_out_windows(before.tokenizer, ctx, windows, text=text)
    ppl = [perplexity(logits_fn(p), ids) for p in (before, after)]
    return {"perplexity": ppl, "windows": windows, "ctx": ctx,
            "text": "given text" if text else "pydoc_data.topics (held out)"}


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embeddings(program, ids: torch.Tensor) -> torch.Tensor:
    """[B, E] mean-pooled last hidden states of ``ids`` [B, S] through ``program`` (an encoder
    called like its example inputs): the sentence embeddings quality is compared on."""
    args, kwargs = program.call_with_tokens(ids)
    with torch.no_grad():
        out = program(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pooled(hidden, kwargs.get("attention_mask", torch.ones_like(ids)))


def calibration_loss(program, reference, batches) -> float:
    """How far ``program`` is from ``reference`` on calibration batches: the mean KL divergence
    of next-token distributions for language models, else the relative squared error of the
    outputs. The objective variants are compared on (lower is better)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for args, kwargs in batches:
            got, want = program(*args, **kwargs), reference(*args, **kwargs)
            if hasattr(got, "logits"):
                p = torch.log_softmax(want.logits.float(), -1)
                q = torch.log_softmax(got.logits.float(), -1)
                total += float((p.exp() * (p - q)).sum(-1).mean())
            else:
                a = [t.float() for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
                b = [t.float() for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
                err = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True))
                total += err / max(sum(float((y ** 2).sum()) for y in b), 1e-30)
            count += 1
    return total / max(count, 1)
