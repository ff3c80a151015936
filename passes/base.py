"""Pass infrastructure: `PassContext`, `PassResult`, and the manager that runs passes, lints
the graph after each, and records what each did in the program's manifest."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch.fx import GraphModule, Node

import rewriter.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.patterns.graph import copy_graph, graph_module_over, tensor_aliases

if TYPE_CHECKING:
    from rewriter.program import Program
    from rewriter.specs import Spec

ATTENTION = torch.ops.rewriter.attention.default


@dataclass
class PassContext:
    """What passes may use besides the program: calibration data and a progress callback."""

    # batches, each (args, kwargs) ready to call the module; or a factory, called on first use
    calibration: list | Callable[[], list] | None = None
    progress: Callable[[str, int, int], None] | None = None  # (task, done, total)

    def report(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)

    def batches(self, program: Program) -> list[tuple[tuple, dict]]:
        from rewriter.errors import SpecError

        if callable(self.calibration):
            self.calibration = self.calibration()
        if not self.calibration:
            raise SpecError("this variant needs calibration data: pass calibration=[batches] "
                            "(token tensors or (args, kwargs) pairs)")
        return self.calibration


@dataclass
class PassResult:
    program: Program
    changed: bool
    counts: dict = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def run(self, program: Program, ctx: PassContext) -> PassResult: ...


def clone_program(program: Program) -> Program:
    """A Program with its own graph and module hierarchy; tensors are shared until a pass
    replaces them (passes never edit a tensor in place)."""
    from rewriter.program import Program

    new = graph_module_over(program.module, copy_graph(program.module))
    clone = Program(module=new, original=program._original,
                    sites=[copy.deepcopy(s) for s in program.sites],
                    rejected=list(program.rejected), example_args=program.example_args,
                    example_kwargs=program.example_kwargs,
                    manifest=copy.deepcopy(program.manifest), tokenizer=program.tokenizer)
    clone.hf_config = program.hf_config
    return clone


def canonical_nodes(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION}


def lint(program: Program) -> None:
    """The graph is well formed and every site still names a canonical node of matching heads."""
    program.module.graph.lint()
    nodes = canonical_nodes(program.module)
    for site in program.sites:
        node = nodes.get(site.node)
        if node is None:
            raise AssertionError(f"site {site.index} names missing node {site.node!r}")
        q, k = (a.meta.get("val") for a in node.args[:2])
        if q is not None and q.shape[1] != site.num_heads:
            raise AssertionError(f"site {site.index}: graph has {q.shape[1]} query heads, "
                                 f"site says {site.num_heads}")
        if k is not None and k.shape[1] != site.num_kv_heads:
            raise AssertionError(f"site {site.index}: graph has {k.shape[1]} kv heads, "
                                 f"site says {site.num_kv_heads}")


def remove_unused_attributes(gm: GraphModule) -> int:
    """Delete parameters/buffers no get_attr reads any more (e.g. a removed k_proj); a tied
    name stays while the tensor is read under another. Returns the number of elements freed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = dict((*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)))
    freed = 0
    for names in tensor_aliases(gm).values():
        if used.intersection(names):
            continue
        freed += tensors[names[0]].numel()
        for name in names:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    return freed


def run_passes(program: Program, passes: Iterable[tuple[Pass, Spec]],
               ctx: PassContext) -> Program:
    from rewriter.passes.canonicalize import cleanup

    for pass_, spec in passes:
        before = program.parameter_count()
        result = pass_.run(program, ctx)
        program = result.program
        cleanup(program.module)
        remove_unused_attributes(program.module)
        result.counts["parameters_removed"] = before - program.parameter_count()
        lint(program)
        program.manifest.setdefault("passes", []).append(
            {"spec": str(spec), "changed": result.changed, **result.counts})
    return program
