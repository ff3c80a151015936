"""Domain errors. Each carries a one-line message meant for users; the CLI maps them to exit
codes and never shows a traceback for them."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries often add pages)."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), repr(exc))


class RewriterError(Exception):
    exit_code = 1


class CaptureError(RewriterError):
    """torch.export could not capture the model."""

    exit_code = 3


class NoAttentionError(RewriterError):
    """The model has no attention the patterns recognize. ``rejected`` lists why each
    softmax/SDPA candidate was not attention."""

    exit_code = 4

    def __init__(self, message: str, rejected: list | None = None):
        super().__init__(message)
        self.rejected = rejected or []


class ModelLoadError(RewriterError):
    """A path or name that is not a model we can load."""

    exit_code = 2


class SpecError(RewriterError):
    """A variant spec that does not parse or does not apply."""

    exit_code = 2


class CalibrationError(RewriterError):
    """Calibration data that does not fit the model (or is missing)."""

    exit_code = 2
