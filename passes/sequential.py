"""Sequential execution: a program run one layer block at a time.

The graph is cut before the first node of each layer block: the module path of a site up to
its layer index (``model.layers.3``, ``transformer.h.3``, ``encoder.layer.3``), found in the
export's ``nn_module_stack``. Block i needs only the values that cross its cut (the residual
stream, position tables, masks), so `Sequential` keeps just those between blocks. A pass can
then look at, change or train layer i on the inputs that layers 0..i-1 *as they are now*
produce, and run a teacher's block i on the same inputs (`Sequential.align`). Weights are
read when their block runs, so only crossing activations are held: the path that lets a
model larger than memory be calibrated one layer at a time.

Segment 0 is everything before the first block (embeddings, position tables, masks); the
last segment is everything after the last block begins (that block, the final norm, the
head). Segment i + 1 holds block i.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx._pytree import tree_flatten_spec
from torch.fx.node import map_arg

from rewriter.errors import RewriterError
from rewriter.ir.graph import fetch_attr

Env = dict[str, Any]  # node name -> value, for the values that cross the next cut
# (site index, q, k, v, attn_mask, attrs) -> output: see rewriter.passes.observe
Observer = Callable[..., torch.Tensor]

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_path(module_path: str) -> str | None:
    """The layer block a module belongs to: its path up to the first numeric component."""
    match = _LAYER.match(module_path)
    return match.group(1) if match else None


class Sequential:
    """Runs ``module``'s graph segment by segment (see the module docstring).

    ``sites`` (the program's) name the blocks and, with ``observe``, which canonical nodes
    call the observer instead of the op. ``blocks`` names the blocks instead (a teacher's,
    when the program has dropped the attention of some: their blocks still hold an MLP)."""

    def __init__(self, module: GraphModule, sites, blocks: list[str] | None = None):
        self.module = module
        self.site_of = {s.node: s.index for s in sites}
        nodes = list(module.graph.nodes)
        wanted = blocks if blocks is not None else \
            [b for b in dict.fromkeys(block_path(s.module_path) or "" for s in sites) if b]
        first: dict[str, int] = {}
        for i, node in enumerate(nodes):
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                block = block_path(path)
                if block in wanted and block not in first:
                    first[block] = i
        if len(first) < len(wanted):
            missing = [b for b in wanted if b not in first]
            raise RewriterError(f"cannot cut the graph into layers: no node of {missing[0]!r} "
                                "in the export's module stacks")
        self.blocks = sorted(first, key=first.__getitem__)  # block i runs in segment i + 1
        cuts = [first[b] for b in self.blocks]
        bounds = [0, *cuts, len(nodes)]
        self.segments = [[n for n in nodes[a:b] if n.op not in ("placeholder", "get_attr")]
                         for a, b in zip(bounds, bounds[1:], strict=False)]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.last_use: dict[str, int] = {}  # node name -> last segment reading it
        for i, segment in enumerate(self.segments):
            for node in segment:
                for used in node.all_input_nodes:
                    if used.op != "get_attr":
                        self.last_use[used.name] = i
        self.segment_of_site = {self.site_of[n.name]: i for i, seg in enumerate(self.segments)
                                for n in seg if n.name in self.site_of}

    def __len__(self) -> int:
        return len(self.segments)

    def start(self, args: tuple, kwargs: dict) -> Env:
        """The placeholder values for a call ``module(*args, **kwargs)``."""
        flat = _flat_inputs(self.module, args, kwargs)
        if len(flat) != len(self.placeholders):
            raise RewriterError(f"the graph takes {len(self.placeholders)} inputs, got "
                                f"{len(flat)}")
        return {n.name: v for n, v in zip(self.placeholders, flat, strict=True)}

    def run(self, env: Env, i: int, observe: Observer | None = None,
            weights: Callable[[str], torch.Tensor | None] | None = None
            ) -> tuple[Env, list[str]]:
        """Run segment i on ``env``: the env after it (values no later segment reads are
        dropped; the graph's output is under ``"output"``) and the names it produced that
        cross the next cut (``"output"`` included). ``weights(name)`` may stand in for a
        module attribute (e.g. a weight being trained, or one plus a low-rank update)."""
        values = dict(env)
        attrs: dict[str, Any] = {}

        def lookup(node: Node):
            if node.op == "get_attr":
                if node.target not in attrs:
                    w = weights(node.target) if weights is not None else None
                    if w is None:  # frozen: gradients flow only into what ``weights`` gives
                        w = fetch_attr(self.module, node.target)
                        if isinstance(w, torch.Tensor) and torch.is_grad_enabled():
                            # only then: aten.linear folds a strided 3-D input into one
                            # matmul only when the weight needs no grad (results 1e-7 apart),
                            # so without grad the program's own kernels run
                            w = w.detach()
                    attrs[node.target] = w
                return attrs[node.target]
            try:
                return values[node.name]
            except KeyError:
                raise RewriterError(f"segment {i} reads {node.name!r}, which no earlier "
                                    "segment kept") from None

        produced = []
        for node in self.segments[i]:
            args = map_arg(node.args, lookup)
            kwargs = map_arg(node.kwargs, lookup)
            if node.op == "output":
                values["output"] = self.module.graph._codegen.process_outputs(args[0])
                produced.append("output")
                continue
            if observe is not None and node.name in self.site_of:
                q, k, v, *rest = args
                value = observe(self.site_of[node.name], q, k, v, rest[0] if rest else None,
                                dict(kwargs))
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # call_module
                value = fetch_attr(self.module, node.target)(*args, **kwargs)
            values[node.name] = value
            produced.append(node.name)
        kept = {name: v for name, v in values.items()
                if name == "output" or self.last_use.get(name, -1) > i}
        return kept, [n for n in produced if n in kept]

    def output(self, env: Env):
        return env["output"]

    def forward(self, args: tuple, kwargs: dict, **run_kwargs):
        """The whole graph, segment after segment: what ``module(*args, **kwargs)`` returns."""
        env = self.start(args, kwargs)
        for i in range(len(self)):
            env, _ = self.run(env, i, **run_kwargs)
        return self.output(env)

    def attributes(self, i: int) -> set[str]:
        """The module attributes (weights) segment i reads."""
        return {n.target for node in self.segments[i] for n in node.all_input_nodes
                if n.op == "get_attr"}


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Give the memory freed by the last layer back to the system (glibc's ``malloc_trim``;
    nothing elsewhere). Layer-sized temporaries are freed into the heap and, split up and
    reused for smaller ones, stay resident otherwise: on a 1.1 B model they added 0.3 GB per
    four layers to a calibrated rewrite that should hold one layer's."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def check_aligned(student: Sequential, teacher: Sequential) -> None:
    if student.blocks != teacher.blocks:
        raise RewriterError("the rewritten program and the original are cut into different "
                            f"layer blocks ({len(student.blocks)} vs {len(teacher.blocks)})")


def align(teacher_env: Env, student_env: Env) -> Env:
    """The teacher's env with every value the student also carries replaced by the
    student's: the teacher's next segment then runs on the student's inputs."""
    return {**teacher_env, **{k: v for k, v in student_env.items() if k in teacher_env}}


def _flat_inputs(module: GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values, flattened as the module's generated forward does."""
    info = getattr(module.graph._codegen, "pytree_info", None)
    if info is None:
        return list(args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    values = [bound.arguments[name] for name in info.orig_args]
    spec = info.in_spec
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple \
            and spec.child(1).type is dict:
        count = spec.child(0).num_children
        structure: Any = (values[:count], dict(zip(spec.child(1).context, values[count:],
                                                   strict=True)))
    else:
        structure = values
    return list(tree_flatten_spec(structure, spec))
