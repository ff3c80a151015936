"""The ONNX Runtime backend: the program exported to ONNX (standard opset-23 ops, see
rewriter.codegen.onnx) and run by an ONNX Runtime session on the CPU. It runs whole programs
outside torch, so it has no op to lower canonical nodes to: `runner` is its way in."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rewriter.codegen.backend import register_backend


class OrtBackend:
    name = "ort"
    summary = "ONNX Runtime (the program exported to ONNX, run on the CPU)"
    op = None
    target = "onnx"  # the export target it runs; "ort" contrib ops work too

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        return True, "onnxruntime (CPUExecutionProvider)"

    def supports(self, site, **call) -> tuple[bool, str]:  # noqa: ARG002
        return True, ""  # standard ONNX expresses every canonical op (decomposed at worst)

    def lower_site(self, site, **call) -> dict:  # noqa: ARG002  (lowered at export)
        return {}

    def runner(self, program, workdir: Path):
        """Export to ``workdir/model.onnx``; returns (args, kwargs) -> the ONNX outputs."""
        from rewriter.codegen.onnx.export import export_program
        from rewriter.codegen.ort.runtime import run, session

        path = Path(workdir) / "model.onnx"
        export_program(program, path, self.target)
        sess = session(path)
        return lambda *args, **kwargs: run(sess, *args, **kwargs)


BACKEND = register_backend(OrtBackend())
