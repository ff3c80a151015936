"""Size reads moved to the graph inputs (issue #18): ``Shape(x, start=a, end=a+1)`` whose axis a
is a symbolic size that a graph input also has -> ``Shape(input, start=k, end=k+1)``.

Why: every attention site computes its sizes off its own tensors (B and S off its packed query,
P off its own past_key), so CSE cannot share them and a decoder step ran the same seqlens_k,
total_sequence_length and cos/sin cache Pads once per layer (about 20 small nodes a layer on
SmolLM2). Once every read names the same graph input, CSE leaves one of each.

Why it is exact: the exporter names a symbolic axis after the graph input axis it was proved
equal to (torch.export's shape environment: the unbounded past_key/past_value inputs share the
one ``past_sequence`` Dim, a bounded cache has ``past_sequence_<bound>`` (codegen/onnx/export.py),
every packed q/k/v has input_ids' ``batch`` and ``sequence``). Equal
names are equal sizes; a size the exporter could only write as an expression ("past_sequence +
sequence") or did not record is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir


def input_axes(graph: ir.Graph) -> dict[str, tuple[ir.Value, int]]:
    """Symbolic size name -> (the first graph input that has it, its axis)."""
    found: dict[str, tuple[ir.Value, int]] = {}
    for value in graph.inputs:
        for axis, size in enumerate(value.shape or ()):
            if isinstance(size, ir.SymbolicDim) and size.value is not None:
                found.setdefault(size.value, (value, axis))
    return found


def _one_axis(node: ir.Node) -> int | None:
    """a, when ``node`` is Shape(x, start=a, end=a+1) on an x of known rank; else None."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
    return start if end == start + 1 else None


def sizes_from_graph_inputs(model: ir.Model) -> int:
    """Point every one-axis Shape read of a named symbolic size at the graph input that has
    it (in place); returns how many reads moved."""
    graph = model.graph
    source = input_axes(graph)
    moved = 0
    for node in graph:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            continue
        axis = _one_axis(node)
        if axis is None:
            continue
        size = node.inputs[0].shape[axis]
        if not isinstance(size, ir.SymbolicDim) or size.value not in source:
            continue
        value, k = source[size.value]
        if value is node.inputs[0] and k == axis:
            continue
        node.replace_input_with(0, value)
        node.attributes["start"] = ir.AttrInt64("start", k)
        node.attributes["end"] = ir.AttrInt64("end", k + 1)
        moved += 1
    return moved
