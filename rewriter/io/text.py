"""Text for calibration and evaluation: token windows of pydoc_data.topics (ships with
CPython, over 100k tokens of English prose) or of a user's text."""

from __future__ import annotations

import torch


def calibration_text() -> str:
    """Over 100k tokens of English prose that ships with CPython (pydoc topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_windows(tokenizer, seq_len: int, batch: int, text: str | None = None,
                  offset: int = 0) -> torch.Tensor:
    """[batch, seq_len] consecutive windows of the tokenized text, from token ``offset``."""
    need = seq_len * batch + offset
    ids = _tokenized(tokenizer, text, need)
    if ids.numel() < need:
        raise ValueError(f"text has {ids.numel()} tokens, need {need}")
    return ids[offset:need].view(batch, seq_len).clone()


def leading_windows(tokenizer, seq_len: int, batch: int, text: str | None = None
                    ) -> torch.Tensor:
    """`token_windows` from the start of the text, or every whole window it holds when that is
    fewer than ``batch`` (possibly none): [count, seq_len]."""
    ids = _tokenized(tokenizer, text, seq_len * batch)
    count = min(batch, ids.numel() // seq_len)
    return ids[: count * seq_len].view(count, seq_len).clone()


_TOKENIZED: dict[tuple[int, int], torch.Tensor] = {}


def _tokenized(tokenizer, text: str | None, need: int) -> torch.Tensor:
    """Token ids of the text's longest cached prefix holding ``need`` tokens (English prose
    runs about 4 characters a token; we read 8 per token needed, then all of it if short)."""
    text = calibration_text() if text is None else text
    for chars in (min(len(text), 8 * need + 64), len(text)):
        key = (id(tokenizer), hash(text), chars)
        if key not in _TOKENIZED:
            _TOKENIZED[key] = torch.tensor(
                tokenizer(text[:chars], add_special_tokens=False).input_ids, dtype=torch.long)
        if _TOKENIZED[key].numel() >= need:
            break
    return _TOKENIZED[key]
