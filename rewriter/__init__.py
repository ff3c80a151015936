"""attention-rewriter: a compiler for the attention in pretrained models.

    import rewriter as rw
    prog = rw.capture(model, args=(input_ids,))
    print(prog.summary())
    print(prog.verify())
    new = rw.rewrite(prog, ["sparse:window=256,sink=4"])

Attributes are imported on first use, so ``import rewriter`` (and the CLI's ``--help``) stays
fast; torch and the canonical op load with the first capture.
"""

from importlib import import_module

from rewriter.errors import (
    CaptureError,
    ModelLoadError,
    NoAttentionError,
    RewriterError,
    SpecError,
)

_LAZY = {
    "capture": "rewriter.frontend",
    "rewrite": "rewriter.api",
    "Program": "rewriter.program",
    "VerifyReport": "rewriter.analysis.verify",
    "AttentionSite": "rewriter.ir.site",
    "Projection": "rewriter.ir.site",
    "MaskSpec": "rewriter.ir.masks",
    "load": "rewriter.api",
    "load_model": "rewriter.models",
}


_RENAMED = {"load_model": "load"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")


__all__ = [
    "AttentionSite",
    "CaptureError",
    "MaskSpec",
    "ModelLoadError",
    "NoAttentionError",
    "Program",
    "Projection",
    "RewriterError",
    "SpecError",
    "VerifyReport",
    "capture",
    "load",
    "load_model",
    "rewrite",
]
__version__ = "0.1.0"
