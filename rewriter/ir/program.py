"""`GraphProgram`: a captured model and its attention sites, the object passes transform."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.fx import GraphModule

from rewriter.errors import CalibrationError
from rewriter.ir.graph import copy_graph, graph_module_over
from rewriter.ir.site import AttentionSite


class GraphProgram:
    """A captured model as passes see it: the GraphModule (``module``, with the model's call
    signature), its attention sites, example inputs and the manifest of what was done to it.
    `rewriter.program.Program` adds the user-facing verbs; passes work on ``clone()``s, so the
    program they are given is never mutated."""

    def __init__(self, module: GraphModule,
                 original: GraphModule | Callable[[], GraphModule], sites: list[AttentionSite],
                 rejected: list | None = None, example_args: tuple = (),
                 example_kwargs: dict | None = None, manifest: dict | None = None,
                 tokenizer=None):
        self.module = module
        self._original = original
        self.sites = sites
        self.rejected = rejected or []
        self.example_args = example_args
        self.example_kwargs = example_kwargs or {}
        self.manifest = manifest or {}
        self.tokenizer = tokenizer  # set when captured from a loaded checkpoint
        self.hf_config = None  # the transformers config of the captured model, if any
        # the program before any rewrite (kept in memory, not saved): what `heal` distills from
        self.teacher: GraphProgram | None = None

    @property
    def original(self) -> GraphModule:
        """The captured graph before canonicalization (same call signature as the model)."""
        if self._original is None:
            raise AttributeError("this program was loaded from disk: the graph before "
                                 "canonicalization is not saved; pass a reference to verify()")
        if not isinstance(self._original, GraphModule):
            self._original = self._original()
        return self._original

    @property
    def has_original(self) -> bool:
        """False for a program loaded from disk (its pre-canonicalization graph is not saved)."""
        return self._original is not None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def call_with_tokens(self, ids: torch.Tensor) -> tuple[tuple, dict]:
        """(args, kwargs) calling the module like the example inputs, with other token ids
        (every ``*input_ids`` input gets them; masks become all-ones)."""
        def like(name, value):
            if not isinstance(value, torch.Tensor):
                return value
            if name.endswith("input_ids"):
                return ids
            if name.endswith("attention_mask"):
                return torch.ones_like(ids)
            if name == "token_type_ids":
                return torch.zeros_like(ids)
            raise CalibrationError(f"cannot make input {name!r} from token ids: pass "
                                   "calibration as (args, kwargs) batches for this model")

        kwargs = {k: like(k, v) for k, v in self.example_kwargs.items()}
        args = self.example_args
        if args:
            if not (isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()):
                raise CalibrationError("the model does not take token ids: pass calibration as "
                                 "(args, kwargs) batches")
            return (ids, *(like(f"arg{i}", a) for i, a in enumerate(args[1:], 1))), kwargs
        if not any(k.endswith("input_ids") for k in kwargs):
            raise CalibrationError("cannot tell where token ids go: the example inputs have no "
                             "positional tensor and no input_ids")
        return (), kwargs

    @property
    def graph(self) -> torch.fx.Graph:
        return self.module.graph

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def site(self, index: int):
        """The site numbered ``index`` (the # column of inspect; numbers stay with their site
        when drop-attn removes others); IndexError naming the numbers there are."""
        for site in self.sites:
            if site.index == index:
                return site
        have = [s.index for s in self.sites]
        listed = f"0..{have[-1]}" if have == list(range(len(have))) and have else \
            ", ".join(map(str, have)) or "none"
        raise IndexError(f"site {index} does not exist (the program has {len(have)} sites: "
                         f"{listed})")

    def clone(self):
        """A program of the same class with its own graph and module hierarchy; tensors are
        shared until a pass replaces them (passes never edit a tensor in place)."""
        module = graph_module_over(self.module, copy_graph(self.module))
        clone = type(self)(module=module, original=self._original,
                           sites=[copy.deepcopy(s) for s in self.sites],
                           rejected=list(self.rejected), example_args=self.example_args,
                           example_kwargs=self.example_kwargs,
                           manifest=copy.deepcopy(self.manifest), tokenizer=self.tokenizer)
        clone.hf_config = self.hf_config
        clone.teacher = self.teacher
        return clone
