"""Numeric comparison of two runs on the same inputs: `VerifyReport`, `compare_outputs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


@dataclass
class OutputError:
    name: str
    shape: tuple
    max_abs: float
    rel: float  # max |a - b| / max |b|


@dataclass
class VerifyReport:
    """Numeric comparison of a program against a reference on the same inputs."""

    outputs: list[OutputError]
    tolerance: float
    precision: str = ""  # "float64" when both sides ran in float64

    @property
    def max_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_rel": self.max_rel, "tolerance": self.tolerance, "ok": self.ok,
                "precision": self.precision or "as run",
                "outputs": [o.__dict__ for o in self.outputs]}

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        worst = max(self.outputs, key=lambda o: o.rel, default=None)
        where = f" (worst: {worst.name} {list(worst.shape)})" if worst else ""
        run = f" ({self.precision})" if self.precision else ""
        return f"{verdict}: max relative error {self.max_rel:.2e} <= {self.tolerance:.0e}{run}" \
            if self.ok else f"{verdict}: max relative error {self.max_rel:.2e}{where}{run}"


def compare_outputs(got: Any, want: Any, tolerance: float = 1e-5, precision: str = ""
                    ) -> VerifyReport:
    got_leaves = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_leaves = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got_leaves) != len(want_leaves):
        raise ValueError(f"outputs differ in structure: {len(got_leaves)} vs "
                         f"{len(want_leaves)} tensors")
    errors = []
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point():
            max_abs = float((a != b).sum())
            errors.append(OutputError(f"output{i}", tuple(a.shape), max_abs, max_abs))
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        max_abs = float((a64 - b64).abs().max()) if a.numel() else 0.0
        scale = float(b64.abs().max()) if b.numel() else 0.0
        rel = max_abs / scale if scale > 0 else max_abs
        errors.append(OutputError(f"output{i}", tuple(a.shape), max_abs, rel))
    return VerifyReport(errors, tolerance, precision)
