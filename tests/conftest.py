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


@pytest.fixture(scope="session")
def zoo_captured():
    """``zoo_captured(name) -> Captured``: a zoo entry built and captured once per process."""
    from attn_testlib import captured_zoo

    return captured_zoo
