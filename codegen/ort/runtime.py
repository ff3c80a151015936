"""ONNX Runtime sessions for exported programs: open one, run it with the program's call
convention, and greedy generation with an exported KV-cache decoder."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from rewriter.errors import RewriterError
from rewriter.ir.padding import AttentionMaskError, check_attention_mask

__all__ = ["generate", "run", "session"]


def generate(sess, input_ids: torch.Tensor, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding with a decoder exported with ``kv_cache=True``: the prompt [B, S]
    followed by ``max_new_tokens`` tokens. The cache starts empty ([B, Hkv, 0, D], shapes
    read from the session's inputs) and each step feeds back the present tensors (and, for a
    bounded decoder, past_length: 0, then present_length). ``attention_mask`` [B, S] (1
    token, 0 pad) for left-padded prompts needs a decoder exported with ``padded=True``
    (it takes attention_mask [B, P + S], grown by one column per step). Inputs and outputs
    go through an IO binding: each step's present OrtValues are bound as the next step's past
    inputs without a copy, and only the logits are read into numpy."""
    import onnxruntime as ort

    inputs = [i for i in sess.get_inputs() if i.name != "attention_mask"]
    padded = len(inputs) < len(sess.get_inputs())
    names = [i.name for i in inputs]
    if len(names) < 2 or names[0] != "input_ids" \
            or not all(n.startswith("past_") for n in names[1:]):
        raise ValueError(f"not a decoder with a KV cache (inputs: {names}); export with "
                         "kv_cache=True")
    mask = None
    if attention_mask is not None:
        mask = _numpy(check_attention_mask(torch.as_tensor(input_ids), attention_mask))
        if not padded and not mask.all():
            raise AttentionMaskError("this ONNX decoder has no attention_mask input: export it "
                                     "with kv_cache=True, padded=True for left-padded batches")
    outputs = [o.name for o in sess.get_outputs()]
    present = [outputs.index(n.replace("past_", "present_", 1)) for n in names[1:]]
    batch = input_ids.shape[0]
    past = [ort.OrtValue.ortvalue_from_numpy(p) for p in empty_past(inputs[1:], batch)]
    step = _numpy(input_ids).astype(np.int64)
    if padded and mask is None:
        mask = np.ones(step.shape, dtype=np.int64)
    out = [step]
    binding = sess.io_binding()
    for _ in range(max_new_tokens):
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(step))
        for name, value in zip(names[1:], past, strict=True):
            binding.bind_ortvalue_input(name, value)
        if padded:
            binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask))
        for name in outputs:  # rebound each step, else ORT would write into last step's
            binding.bind_output(name, "cpu")  # outputs, which are this step's past inputs
        sess.run_with_iobinding(binding)
        results = binding.get_outputs()
        step = results[0].numpy()[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(step)
        past = [results[j] for j in present]
        if padded:
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return torch.from_numpy(np.concatenate(out, axis=1))


def empty_past(inputs, batch: int) -> list[np.ndarray]:
    """Zero-length caches [B, Hkv, 0, D] for a session's past_* inputs (past_length: 0)."""
    return [np.zeros((), dtype=np.int64) if i.name == "past_length" else
            np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=_numpy_dtype(i.type))
            for i in inputs]


def _numpy_dtype(onnx_type: str):
    """'tensor(float)' -> np.float32 (the types our exports use for the cache)."""
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(double)": np.float64}[onnx_type]


def session(path: str | os.PathLike, *, threads: int | None = None,
            providers: list[str] | None = None):
    """An onnxruntime.InferenceSession (CPU by default; contrib ops need ONNX Runtime). A
    bfloat16 model on a provider without bfloat16 kernels (ONNX Runtime's CPU provider) is a
    one-line RewriterError that says what to export instead."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:  # onnxruntime's own NotImplemented, Fail, ... types
        if "NOT_IMPLEMENTED" in str(exc) and _is_bfloat16(path):
            missing = str(exc).split("implementation for ", 1)[-1].split(" node")[0]
            raise RewriterError(
                f"{path}: ONNX Runtime ({', '.join(providers)}) has no bfloat16 kernel for "
                f"{missing}: export the program in float16 or float32 (load the model with "
                "--dtype float16 / rewriter.models.load(..., 'float16'))") from exc
        raise


def _is_bfloat16(path) -> bool:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
               for v in model.graph.output)


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
