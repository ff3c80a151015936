"""The top of the public API: `rewrite` (variant specs applied to a model or Program, in
order) and `load` (a Program saved by `Program.save`). `capture` is rewriter.frontend's."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from rewriter.analysis.quality import EVAL_OFFSET
from rewriter.checkpoint import read_saved
from rewriter.errors import SpecError
from rewriter.frontend import capture
from rewriter.io.text import leading_windows
from rewriter.ir.specs import Spec
from rewriter.passes import build_pass, parse_spec
from rewriter.passes.base import PassContext, run_passes
from rewriter.program import Program


def rewrite(
    model_or_program: torch.nn.Module | Program,
    specs: str | Sequence[str | Spec],
    *,
    args: tuple | None = None,
    kwargs: dict | None = None,
    calibration: Iterable | str | None = None,
    progress=None,
) -> Program:
    """A new Program with each variant spec applied in order; the input is not changed.

    ``calibration``: token batches ([B, S] tensors), ``(args, kwargs)`` pairs, or a text (needs a
    Program with a tokenizer). By default (None), variants that need data calibrate on
    pydoc_data.topics windows tokenized by the program's tokenizer."""
    if isinstance(specs, (str, Spec)):
        specs = [specs]
    parsed = [s if isinstance(s, Spec) else parse_spec(s) for s in specs]
    passes = [(build_pass(s), s) for s in parsed]  # validates key combinations early
    if isinstance(model_or_program, Program):
        program = model_or_program
        if any(s.backend != "eager" for s in program.sites):
            raise SpecError("this program is compiled for a backend: rewrite the program "
                            "before compile(), not after")
    else:
        if args is None and kwargs is None:
            raise TypeError("rewrite(model, ...) needs args= and/or kwargs= to capture with")
        program = capture(model_or_program, args or (), kwargs)
    ctx = PassContext(
        calibration=lambda count=None: calibration_batches(program, calibration,
                                                           batches=count or 4),
        progress=progress)
    return run_passes(program, passes, ctx)


def calibration_batches(program: Program, calibration: Any, *, seq_len: int = 512,
                        batches: int = 4, batch_size: int = 1) -> list[tuple[tuple, dict]]:
    """Normalize calibration input to (args, kwargs) calls of program.module. From text,
    ``batches`` windows of ``seq_len`` tokens, or as many as the text holds (the default text
    stops before the held-out evaluation windows)."""
    if calibration is None or isinstance(calibration, str):
        if program.tokenizer is None:
            raise SpecError("this variant needs calibration data: pass calibration= token "
                            "batches, or capture through rewriter.models.load so the "
                            "tokenizer is known")
        want = batches * batch_size
        if calibration is None:
            want = min(want, EVAL_OFFSET // seq_len)
        ids = leading_windows(program.tokenizer, seq_len, want, text=calibration)
        if not len(ids):
            raise SpecError(f"the calibration text is shorter than one window of {seq_len} "
                            "tokens")
        calibration = list(ids.split(batch_size))
    out = []
    for batch in calibration:
        if isinstance(batch, torch.Tensor):
            out.append(program.call_with_tokens(batch))
        elif isinstance(batch, dict):
            out.append(((), batch))
        else:
            a, k = batch
            out.append((tuple(a), dict(k)))
    return out


def load(path: str | Path) -> Program:
    """A Program from a directory written by `Program.save` (the graph before
    canonicalization is not kept: verify against another reference)."""
    return Program(original=None, **read_saved(path))
