"""Shared test setup: ``tests/`` on sys.path (for ``zoo`` and ``attn_testlib``), one torch
thread per xdist worker (two workers on two cores must not oversubscribe)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Triton decorates its own library (tl.zeros, tl.max, ...) when first imported, and kernels run
# by the interpreter (tests/codegen) can only call it if that import saw TRITON_INTERPRET=1.
# Any custom-op call imports torch._dynamo, which imports triton: do it first, here, under the
# interpreter flag, so the test order cannot decide.
if "triton" not in sys.modules:
    _was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _was is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _was


@pytest.fixture(scope="session")
def zoo_captured():
    """``zoo_captured(name) -> Captured``: a zoo entry built and captured once per process."""
    from attn_testlib import captured_zoo

    return captured_zoo
