"""Tensors on disk as safetensors, written one tensor at a time.

``safetensors.torch.save_file`` turns every tensor into bytes before it writes the first one
(twice the weights in memory); `write_safetensors` writes the same format (an 8-byte header
length, a JSON header of dtype/shape/offsets, then the raw little-endian data) straight from each
tensor's memory, so saving a model needs no second copy. Reading goes through the safetensors
library (`read_safetensors`), one tensor at a time."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from rewriter.io.atomic import atomic_writer

# torch dtype -> safetensors dtype name (safetensors' own table)
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CHUNK = 64 << 20  # bytes per write: a large tensor is never copied whole


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs to ``path`` (atomically); returns the bytes of tensor
    data. Tensors must be on the CPU; a non-contiguous one is copied, one at a time."""
    items = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, tensor in items:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            for start in range(0, len(data), CHUNK):
                f.write(memoryview(data[start:start + CHUNK]))
    return offset


def read_safetensors(path: Path, names: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for ``names`` (default: all) in ``path``, read one at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in (f.keys() if names is None else names):
            yield name, f.get_tensor(name)
