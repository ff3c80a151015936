"""The kernel cache: generated sources as files, ``<dir>/<key>.py``, loaded once per process.

The directory is ``$REWRITER_KERNEL_CACHE`` or ``~/.cache/attention-rewriter/kernels``. Files
are written atomically (temp file + os.replace), so concurrent processes never read a half
written kernel. Each file's ``# rewriter-kernel: {...}`` line records its specialization;
`list_kernels` reads that line without importing Triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from rewriter.codegen.triton.spec import KernelSpec
from rewriter.codegen.triton.template import generate

MARKER = "# rewriter-kernel: "
_LOADED: dict[str, Any] = {}  # key -> the kernel's JITFunction
_LOCK = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("REWRITER_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attention-rewriter" / "kernels"


def kernel_path(spec: KernelSpec) -> Path:
    return cache_dir() / f"{spec.key}.py"


def emit(spec: KernelSpec) -> Path:
    """Write the kernel source for ``spec`` unless the cache already holds it."""
    path = kernel_path(spec)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{spec.key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(generate(spec))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(spec: KernelSpec):
    """The generated kernel for ``spec`` (emitted and imported on first use)."""
    kernel = _LOADED.get(spec.key)
    if kernel is not None:
        return kernel
    with _LOCK:
        if spec.key not in _LOADED:
            path = emit(spec)
            name = f"rewriter_kernels.{spec.name}_{spec.key}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            _LOADED[spec.key] = getattr(module, spec.name)
    return _LOADED[spec.key]


def list_kernels() -> list[dict]:
    """One dict per cached kernel file: its specialization plus ``path``."""
    out = []
    folder = cache_dir()
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.py")):
        try:
            with path.open() as f:
                line = next((ln for ln in f if ln.startswith(MARKER)), None)
            info = json.loads(line[len(MARKER):]) if line else {}
        except (OSError, json.JSONDecodeError):
            info = {}
        out.append({"key": info.get("key", path.stem), "name": info.get("name", "?"),
                    **info, "path": str(path)})
    return out
