"""attention-rewriter: a compiler for the attention in pretrained models.

    import rewriter as rw
    prog = rw.capture(model, args=(input_ids,))
    print(prog.summary())
    print(prog.verify())
"""

from rewriter import ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.api import rewrite
from rewriter.capture import capture
from rewriter.errors import (
    CaptureError,
    ModelLoadError,
    NoAttentionError,
    RewriterError,
    SpecError,
)
from rewriter.program import Program, VerifyReport
from rewriter.site import AttentionSite, Projection

__all__ = [
    "AttentionSite",
    "CaptureError",
    "ModelLoadError",
    "NoAttentionError",
    "Program",
    "Projection",
    "RewriterError",
    "SpecError",
    "VerifyReport",
    "capture",
    "rewrite",
]
__version__ = "0.1.0"
