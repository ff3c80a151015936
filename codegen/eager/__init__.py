"""The eager backend: the canonical op's own implementation (SDPA where the semantics
coincide, the reference math elsewhere; rewriter.ir.ops). It serves every site, runs anywhere,
and is what every other backend is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.codegen.backend import register_backend


class EagerBackend:
    name = "eager"
    summary = "PyTorch: the canonical op's own implementation (SDPA or the reference math)"
    op = torch.ops.rewriter.attention.default

    def available(self) -> tuple[bool, str]:
        return True, "PyTorch"

    def supports(self, site, **call) -> tuple[bool, str]:  # noqa: ARG002  (serves every call)
        return True, ""

    def lower_site(self, site, **call) -> dict:  # noqa: ARG002  (nothing to prepare)
        return {}

    def runner(self, program, workdir: Path):  # noqa: ARG002  (needs no files)
        return program.module


BACKEND = register_backend(EagerBackend())
