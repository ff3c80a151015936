"""Atomic outputs: a file or a directory appears complete or not at all.

Each is written to a temporary sibling and renamed into place, so a failure leaves nothing half
written, and an existing output is never touched unless ``force`` (then replaced only once the
new one is complete). Outputs get the permissions the umask gives a new file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rewriter.errors import RewriterError


class OutputExistsError(RewriterError):
    exit_code = 5


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise OutputExistsError(f"{path} exists and is not empty: pick another --out or pass "
                                "--force to replace it")


def atomic_directory(path: Path, force: bool, fill: Callable[[Path], None]) -> None:
    """Create ``path`` by filling a temporary sibling directory and renaming it."""
    path = Path(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
    try:
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: a reader
    never sees a half-written file."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write piece by piece, renamed to ``path`` once the block completes
    (removed if it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
