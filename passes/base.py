"""Pass infrastructure: `PassContext`, `PassResult`, and the manager that runs passes, lints
the graph after each, and records what each did in the program's manifest."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rewriter.errors import SpecError
from rewriter.ir.graph import canonical_nodes, cleanup, remove_unused_attributes
from rewriter.ir.program import GraphProgram as Program

if TYPE_CHECKING:
    from rewriter.ir.specs import Spec


@dataclass
class PassContext:
    """What passes may use besides the program: calibration data, a progress callback and the
    teacher (the program before any rewrite, which `heal` trains toward)."""

    # batches, each (args, kwargs) ready to call the module; or a factory, called on first use
    # with the number of batches wanted (None: the default few)
    calibration: list | Callable[..., list] | None = None
    # (task, done, total), and status="..." (e.g. a running loss) when a pass has one
    progress: Callable[..., None] | None = None
    teacher: Program | None = None

    def report(self, task: str, done: int, total: int, status: str = "") -> None:
        if self.progress is None:
            return
        if status and _takes_status(self.progress):
            self.progress(task, done, total, status=status)
        else:
            self.progress(task, done, total)

    def batches(self, program: Program, count: int | None = None) -> list[tuple[tuple, dict]]:
        """The calibration batches; ``count`` asks a default source for that many (a list the
        user gave is returned as it is)."""
        if callable(self.calibration):
            if count is not None:
                return self.calibration(count)
            self.calibration = self.calibration()
        if not self.calibration:
            raise SpecError("this variant needs calibration data: pass calibration=[batches] "
                            "(token tensors or (args, kwargs) pairs)")
        return self.calibration


def _takes_status(fn: Callable) -> bool:
    """Whether a progress callback accepts ``status=`` (the older ones take three arguments)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "status" or p.kind is p.VAR_KEYWORD for p in params)


@dataclass
class PassResult:
    program: Program
    changed: bool
    counts: dict = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def run(self, program: Program, ctx: PassContext) -> PassResult: ...


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


def is_rewritten(program: Program) -> bool:
    return any(p.get("changed") for p in program.manifest.get("passes", []))


def run_passes(program: Program, passes: Iterable[tuple[Pass, Spec]],
               ctx: PassContext) -> Program:
    """Run each pass, clean and lint after it, and record it in the manifest. The teacher is
    the program before any rewrite: this one, or the one it was rewritten from in this
    process (a program loaded from disk has none)."""
    if ctx.teacher is None:
        ctx.teacher = program.teacher if is_rewritten(program) else program
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
        program.teacher = ctx.teacher
    return program
