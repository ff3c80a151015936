"""Triton tests run the generated kernels in the interpreter (TRITON_INTERPRET=1, on CPU) and
write kernels to a private cache directory, for this directory's tests only."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def triton_interpreter(tmp_path_factory):
    # Triton reads TRITON_INTERPRET when a kernel is decorated, which happens when a generated
    # kernel file is imported during a test: setting it here is early enough.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("REWRITER_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield
