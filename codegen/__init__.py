"""Backends for the canonical op (one folder each, registered in rewriter.codegen.backend):
``eager`` (the reference), ``triton`` (generated kernels), ``ort`` (ONNX Runtime); and ``onnx``,
the export to ONNX that the ort backend runs."""

from rewriter.codegen import eager, ort, triton  # noqa: F401  (each registers its backend)
from rewriter.codegen.backend import BACKENDS, compile_program, get_backend, runner

__all__ = ["BACKENDS", "compile_program", "get_backend", "runner"]
