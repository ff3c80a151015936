"""Hugging Face hub ids (``org/name``) resolved from the local hub cache only: this tool never
downloads (``huggingface_hub.snapshot_download(local_files_only=True)``)."""

from __future__ import annotations

import re
from pathlib import Path

from rewriter.errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot directory of ``repo_id`` at ``revision`` (a branch, tag or commit;
    default main), or a ModelLoadError naming the cache that was searched."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"this tool does not download: fetch it there first (`hf download {repo_id}`) or "
            "pass a local directory") from None
