"""Silencing other libraries' progress bars while the tool draws its own."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_tqdm():
    """TQDM_DISABLE=1 for the duration (transformers' GGUF loader and shard writer draw bars)."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old
