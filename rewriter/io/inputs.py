"""Example inputs on disk: tensors as safetensors plus a JSON description (no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from rewriter.errors import RewriterError


def save_inputs(args: tuple, kwargs: dict, tensors_path: Path) -> dict:
    """Example inputs as safetensors + a JSON description (no pickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def describe(name: str, value):
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous()
            return {"tensor": name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise RewriterError(f"cannot save example input {name} of type {type(value).__name__}")

    spec = {"args": [describe(f"arg{i}", a) for i, a in enumerate(args)],
            "kwargs": {k: describe(f"kw.{k}", v) for k, v in kwargs.items()}}
    save_file(tensors, str(tensors_path))
    return spec


def load_inputs(spec: dict, tensors_path: Path) -> tuple[tuple, dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(tensors_path)) if tensors_path.exists() else {}

    def value(d: dict):
        return tensors[d["tensor"]] if "tensor" in d else d["value"]

    return tuple(value(a) for a in spec["args"]), {k: value(v) for k, v in spec["kwargs"].items()}
