"""`Program`: a captured model, its attention sites, and what was done to it."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

import rewriter.ops  # noqa: F401  (registers torch.ops.rewriter.attention)
from rewriter.errors import CalibrationError
from rewriter.patterns.core import Rejection
from rewriter.precision import EXACT_TOLERANCE, float64_module, to_float64
from rewriter.site import AttentionSite


@dataclass
class OutputError:
    name: str
    shape: tuple
    max_abs: float
    rel: float  # max |a - b| / max |b|


@dataclass
class VerifyReport:
    """Numeric comparison of a program against a reference on the same inputs."""

    outputs: list[OutputError]
    tolerance: float
    precision: str = ""  # "float64" when both sides ran in float64

    @property
    def max_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_rel": self.max_rel, "tolerance": self.tolerance, "ok": self.ok,
                "precision": self.precision or "as run",
                "outputs": [o.__dict__ for o in self.outputs]}

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        worst = max(self.outputs, key=lambda o: o.rel, default=None)
        where = f" (worst: {worst.name} {list(worst.shape)})" if worst else ""
        run = f" ({self.precision})" if self.precision else ""
        return f"{verdict}: max relative error {self.max_rel:.2e} <= {self.tolerance:.0e}{run}" \
            if self.ok else f"{verdict}: max relative error {self.max_rel:.2e}{where}{run}"


def compare_outputs(got: Any, want: Any, tolerance: float = 1e-5, precision: str = ""
                    ) -> VerifyReport:
    got_leaves = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_leaves = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got_leaves) != len(want_leaves):
        raise ValueError(f"outputs differ in structure: {len(got_leaves)} vs "
                         f"{len(want_leaves)} tensors")
    errors = []
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point():
            max_abs = float((a != b).sum())
            errors.append(OutputError(f"output{i}", tuple(a.shape), max_abs, max_abs))
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        max_abs = float((a64 - b64).abs().max()) if a.numel() else 0.0
        scale = float(b64.abs().max()) if b.numel() else 0.0
        rel = max_abs / scale if scale > 0 else max_abs
        errors.append(OutputError(f"output{i}", tuple(a.shape), max_abs, rel))
    return VerifyReport(errors, tolerance, precision)


class Program:
    """A captured model. ``module`` runs with the model's call signature; rewrites return a new
    Program and never mutate this one."""

    def __init__(self, module: GraphModule,
                 original: GraphModule | Callable[[], GraphModule], sites: list[AttentionSite],
                 rejected: list[Rejection] | None = None, example_args: tuple = (),
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

    @property
    def original(self) -> GraphModule:
        """The captured graph before canonicalization (same call signature as the model)."""
        if self._original is None:
            raise AttributeError("this program was loaded from disk: the graph before "
                                 "canonicalization is not saved; pass a reference to verify()")
        if not isinstance(self._original, GraphModule):
            self._original = self._original()
        return self._original

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

    def verify(self, original: Any = None, args: tuple | None = None,
               kwargs: dict | None = None, tolerance: float | None = None, *,
               float64: bool = False) -> VerifyReport:
        """Run this program and ``original`` (a Program, an nn.Module, or by default the graph
        captured before canonicalization) on the same inputs and compare every output.

        ``float64``: both sides run in float64 (rewriter.precision), where rounding is ~1e-15
        whatever the CPU, so a mismatch means the graphs compute different things; the default
        tolerance is then ``EXACT_TOLERANCE`` instead of 1e-5."""
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None and args is self.example_args \
            else (kwargs or {})
        if not isinstance(args, tuple):
            args = (args,)
        reference = self.original if original is None else original
        if isinstance(reference, Program):
            reference = reference.module
        module = self.module
        if float64:
            shared: dict = {}  # tensors both sides read are converted once
            module = float64_module(module, shared)
            reference = float64_module(reference, shared)
            args, kwargs = to_float64((args, kwargs))
        if tolerance is None:
            tolerance = EXACT_TOLERANCE if float64 else 1e-5
        with torch.no_grad():
            got = module(*args, **kwargs)
            want = reference(*args, **kwargs)
        return compare_outputs(got, want, tolerance, "float64" if float64 else "")

    def compile(self, backend: str = "triton") -> Program:
        """A new Program whose canonical nodes run on ``backend`` ("triton": generated kernels,
        inference-only; sites it cannot serve stay eager, the reason in their notes)."""
        from rewriter.compile import compile_program

        return compile_program(self, backend)

    def export_onnx(self, path, target: str = "onnx", *, kv_cache: bool = False) -> list[dict]:
        """Write this program as ONNX (target "onnx": standard ops; "ort": ONNX Runtime contrib
        ops where they fit); returns which op each site became (see rewriter.onnx).
        ``kv_cache``: a decoder step with past/present key-value inputs and outputs."""
        from rewriter.onnx import export_onnx

        return export_onnx(self, path, target, kv_cache=kv_cache)

    def decoder(self):
        """This causal LM as a step function over a KV cache (rewriter.decoder.Decoder),
        checked against the program before it is returned."""
        from rewriter.decoder import build_decoder

        return build_decoder(self)

    def save(self, path, *, force: bool = False, verification: VerifyReport | None = None) -> dict:
        """Write program.pt2 + manifest.json (+ hf/ where a transformers config expresses the
        result) into the directory ``path``, atomically. Returns the manifest."""
        from rewriter.checkpoint import save_program

        return save_program(self, path, force=force, verification=verification)

    def accounting(self, ctx: int = 1024) -> dict:
        """Attention density and FLOPs at ``ctx`` tokens, KV-cache bytes per token (bf16)."""
        from rewriter.accounting import program_accounting

        return program_accounting(self.sites, ctx)

    def summary(self, width: int = 160) -> str:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=width, record=True)
        console.print(sites_table(self.sites))
        acc = self.accounting(1024)
        console.print(f"{len(self.sites)} sites, {self.parameter_count():,} parameters, "
                      f"KV cache {acc['kv_cache_bytes_per_token']:,} B/token (bf16), attention "
                      f"density {acc['attention_density']:.3f} and "
                      f"{acc['attention_flops'] / 1e9:.2f} GFLOP at 1024 tokens")
        return console.export_text()

    def __repr__(self) -> str:
        return f"Program({len(self.sites)} attention sites, " \
               f"{self.parameter_count():,} parameters)"


def sites_table(sites: list[AttentionSite], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for col in ("#", "layer", "module", "pattern", "Hq", "Hkv", "D", "positional", "mask",
                "scale", "variant", "backend"):
        table.add_column(col, justify="right" if col in ("#", "layer", "Hq", "Hkv", "D")
                         else "left")
    for s in sites:
        pattern = s.pattern + (f" +{s.kv_expansion}" if s.kv_expansion != "none" else "")
        mask = s.mask + (f" softcap={s.softcap:g}" if s.softcap else "") + \
            (" cross" if s.cross else "")
        table.add_row(str(s.index), "" if s.layer is None else str(s.layer), s.module_path,
                      pattern, str(s.num_heads), str(s.num_kv_heads), str(s.head_dim),
                      s.positional, mask, f"{s.scale:.4g}", variant_label(s), backend_label(s))
    return table


def variant_label(site: AttentionSite) -> str:
    parts = []
    if site.sparsity:
        parts.append(site.sparsity)
    if site.kv_source is not None:
        parts.append(f"kv<-{site.kv_source}")
    if site.attn_source is not None:
        parts.append(f"attn<-{site.attn_source}")
    return " ".join(parts) or "-"


def backend_label(site: AttentionSite) -> str:
    """The backend, with the reason when a site fell back from the one asked for."""
    fallback = [n.split(":", 1)[1].strip() for n in site.notes if n.startswith("triton fallback")]
    return f"{site.backend} ({fallback[0]})" if fallback else site.backend
