"""ONNX backend: export a Program with ``torch.onnx.export`` (dynamo) and a translation of
``rewriter::attention`` into ONNX (standard opset-23 ops, or ONNX Runtime contrib ops).

    masks.py      in-graph masks (causal, MaskSpec windows/sinks/dilation/per-head, grid
                  neighbourhoods)
    translate.py  per-site choice of ONNX op and the onnxscript translations
    banded.py     causal sink + window attention on the keys each query block reads
    export.py     torch.onnx.export with dynamic batch/sequence axes, atomic write, manifest
"""

from rewriter.codegen.onnx.export import TARGETS, export_program

__all__ = ["TARGETS", "export_program"]
