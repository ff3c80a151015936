"""Packed projections: MatMuls that read the same activation with constant weights become one.

q/k/v (and gate/up, and a cross-attention's k/v) are exported as separate ``MatMul(x, W_i)``
with ``W_i`` [K, N_i] initializers. One ``MatMul(x, concat(W_i, axis=1))`` followed by a
``Split`` on the last axis computes the same values with one pass over ``x`` and one kernel
launch instead of several. By pattern, not per model: any group of two or more such MatMuls on the
same input value, with weights of one dtype and inner size. Which groups an export packs is
the lowering's choice (``choose``; lean.PACKING): on ONNX Runtime's CPU kernels the Split that
cuts a packed output apart again cost more than the MatMuls saved, so exports pack only the
q/k/v that GroupQueryAttention takes packed.

A weight is an initializer [K, N_i] or the Transpose of an [N_i, K] one (the exporter's form
for real models: the fold leaves weight-sized transposes to ONNX Runtime). The packed weight is
lazy (``onnx_ir.LazyTensor``): the concatenation is made when the model is
written, one group at a time, so an export holds no second copy of the weights; the separate
weights are then unused and are dropped with the nodes.

Shape glossary: x [.., K]; W_i [K, N_i]; packed [K, sum N_i].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

# Given the MatMuls of one group, the ones to pack in the order of the Split's outputs, or None
Choose = Callable[[list[ir.Node]], "list[ir.Node] | None"]


def pack_projections(model: ir.Model, choose: Choose | None = None) -> int:
    """Pack groups of same-input constant-weight MatMuls in ``model``'s main graph (in place):
    every group, or those ``choose`` picks (and orders); returns how many were packed."""
    graph = model.graph
    groups: dict[ir.Value, list[tuple[ir.Node, _Weight]]] = {}
    for node in graph:
        weight = _constant_weight(node)
        if weight is not None:
            groups.setdefault(node.inputs[0], []).append((node, weight))
    order = {node: i for i, node in enumerate(graph)}  # packing keeps the old nodes' order
    packed = 0
    for x, members in groups.items():
        first = members[0][1]
        members = [(n, w) for n, w in members
                   if w.dtype == first.dtype and w.inner == first.inner]
        if choose is not None and len(members) >= 2:
            weights = dict(members)
            chosen = choose([n for n, _ in members]) or []
            members = [(n, weights[n]) for n in chosen]
        if len(members) < 2:
            continue
        _pack(graph, x, members, packed, order)
        packed += 1
    return packed


class _Weight:
    """A MatMul's constant right operand as [K, N]: an initializer, or the Transpose of an
    [N, K] one (how weight-sized transposes are left for ONNX Runtime to fold)."""

    def __init__(self, value: ir.Value, transpose: ir.Node | None):
        self.value, self.transpose = value, transpose
        rows, cols = value.shape
        self.inner, self.outer = (cols, rows) if transpose is not None else (rows, cols)
        self.dtype = value.dtype

    def array(self) -> np.ndarray:
        a = self.value.const_value.numpy()
        return a.T if self.transpose is not None else a


def _constant_weight(node: ir.Node) -> _Weight | None:
    """A MatMul's 2-D constant weight (plain or transposed), or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    x, w = node.inputs
    if x is None or w is None:
        return None
    transpose = w.producer()
    if transpose is not None:
        perm = transpose.attributes.get("perm")
        if transpose.op_type != "Transpose" or perm is None or list(perm.value) != [1, 0] \
                or len(w.uses()) != 1:
            return None
        w = transpose.inputs[0]
    if w is None or not w.is_initializer() or w.const_value is None:
        return None
    if w.shape is None or len(w.shape) != 2 or not all(isinstance(d, int) for d in w.shape):
        return None
    return _Weight(w, transpose)


def _pack(graph: ir.Graph, x: ir.Value, members: list[tuple[ir.Node, _Weight]],
          index: int, order: dict[ir.Node, int]) -> None:
    nodes = [n for n, _ in members]
    weights = [w for _, w in members]
    sizes = [w.outer for w in weights]
    inner, dtype = weights[0].inner, weights[0].dtype
    name = f"packed_weight_{index}"
    shape = ir.Shape([inner, sum(sizes)])

    def concat() -> ir.Tensor:
        return ir.tensor(np.concatenate([w.array() for w in weights], axis=1), dtype=dtype,
                         name=name)

    packed = ir.Value(name=name, type=ir.TensorType(dtype), shape=shape,
                      const_value=ir.LazyTensor(concat, dtype, shape, name=name))
    graph.register_initializer(packed)
    split_sizes = ir.Value(name=f"packed_split_{index}", type=ir.TensorType(ir.DataType.INT64),
                           shape=ir.Shape([len(sizes)]),
                           const_value=ir.tensor(np.array(sizes, dtype=np.int64),
                                                 name=f"packed_split_{index}"))
    graph.register_initializer(split_sizes)
    matmul = ir.Node("", "MatMul", [x, packed], name=f"packed_matmul_{index}")
    split = ir.Node("", "Split", [matmul.outputs[0], split_sizes], attributes=[
        ir.AttrInt64("axis", -1)], num_outputs=len(nodes), name=f"packed_split_{index}")
    first = min(nodes, key=order.__getitem__)
    graph.insert_before(first, [matmul, split])
    for node, out in zip(nodes, split.outputs, strict=True):
        old = node.outputs[0]
        out.type, out.shape = old.type, old.shape
        old_name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = old_name  # keep the names readers (and value_info) know
    for w in weights:
        if w.transpose is not None and not w.transpose.outputs[0].uses():
            graph.remove(w.transpose, safe=True)
        if not w.value.uses():
            graph.initializers.pop(w.value.name, None)


__all__ = ["pack_projections"]
