"""ONNX export and ONNX Runtime sessions for rewritten programs.

    import rewriter as rw
    from rewriter import onnx as rwonnx

    prog.export_onnx("out/model.onnx", target="ort")    # or rwonnx.export_onnx(prog, ...)
    sess = rwonnx.session("out/model.onnx")
    logits, = rwonnx.run(sess, input_ids, attention_mask=mask)

Targets: "onnx" (standard ops, opset 23: runs anywhere) and "ort" (com.microsoft
GroupQueryAttention / MultiHeadAttention where they express the site). Which op each site
became, and why, is in program.manifest["onnx"] and in ``<path>.json``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["export_onnx", "run", "session"]


def export_onnx(program, path: str | os.PathLike, target: str = "onnx", **options) -> list[dict]:
    """Export ``program`` to ``path`` (see rewriter.codegen.onnx.export.export_program)."""
    from rewriter.codegen.onnx.export import export_program

    return export_program(program, path, target, **options)


def session(path: str | os.PathLike, *, threads: int | None = None,
            providers: list[str] | None = None):
    """An onnxruntime.InferenceSession (CPU by default; contrib ops need ONNX Runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), options,
                                providers=providers or ["CPUExecutionProvider"])


def run(sess, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """Run ``sess`` with the program's call convention: positional tensors fill the graph
    inputs in order, keyword tensors go by name; non-tensor arguments (use_cache=False, ...)
    were constants at export and are skipped. Returns the outputs as torch tensors."""
    names = [i.name for i in sess.get_inputs()]
    feed: dict[str, np.ndarray] = {}
    positional = [a for a in args if _is_tensor(a)]
    for name, value in zip(names, positional, strict=False):
        feed[name] = _numpy(value)
    for name, value in kwargs.items():
        if _is_tensor(value) and name in names:
            feed[name] = _numpy(value)
    missing = [n for n in names if n not in feed]
    if missing:
        raise ValueError(f"missing ONNX inputs {missing} (graph inputs: {names})")
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]


def _is_tensor(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
