"""Helpers for the find + canonicalize tests: capture with checks, numeric comparison at
several shapes, rejection reasons, and a tiny configurable attention module."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import rewriter as rw
import rewriter.ir.ops  # noqa: F401  (registers torch.ops.rewriter.attention)

ATTENTION = torch.ops.rewriter.attention.default
SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default,
           torch.ops.aten._safe_softmax.default}
SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = 1e-5
# Two correct fp32 code paths each differ from the exact result by up to the computation's
# rounding noise (measured against float64); allow a few times that between them.
NOISE_FACTOR = 4.0


def noise_tolerance(module, args: tuple, kwargs: dict | None, floor: float) -> float:
    """A cross-path tolerance that rests on the measured fp32 noise of this computation on
    these inputs (rewriter.ir.precision.rounding_noise), never below ``floor``."""
    from rewriter.ir.precision import rounding_noise

    return max(floor, NOISE_FACTOR * rounding_noise(module, args, kwargs))


def output_tensors(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def onnx_equals_program(prog: rw.Program, path, target: str, make_inputs, shapes, tol: float,
                        noise_floor: bool = False, **options) -> list[dict]:
    """Export `prog` to `path`, run onnx.checker, and hold ONNX Runtime (CPU) to
    prog.module at every (batch, seq) in `shapes` within `tol` (relative); ``noise_floor``:
    within the program's measured fp32 noise where that is larger (real models). Returns the
    export's site rows."""
    import onnx

    from rewriter import onnx as rwonnx
    from rewriter.analysis.verify import compare_outputs

    rows = rwonnx.export_onnx(prog, path, target, **options)
    onnx.checker.check_model(str(path))
    sess = rwonnx.session(path, threads=1)
    for batch, seq in shapes:
        args, kwargs = make_inputs(batch, seq)
        with torch.no_grad():
            want = output_tensors(prog.module(*args, **kwargs))
        got = rwonnx.run(sess, *args, **kwargs)
        tolerance = noise_tolerance(prog.module, args, kwargs, tol) if noise_floor else tol
        report = compare_outputs(got, want, tolerance)
        assert report.ok, f"{target} (batch={batch}, seq={seq}): {report}"
    return rows


def quiet_session(path, threads: int | None = None):
    """An ONNX Runtime session that logs warnings (severity 2) and up to stderr, as ORT's
    default does (rwonnx.session silences them); read the log with ``ort_messages``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_messages(text: str) -> list[str]:
    """ONNX Runtime's warning and error log lines ("[W:onnxruntime:...", "[E:...")."""
    return [line for line in text.splitlines()
            if "onnxruntime" in line and ("[W:" in line or "[E:" in line)]


# Tiny dims for hand-written modules: E == H * D.
E, H, HKV, D = 16, 4, 2, 4
# (batch, seq): the capture shape first, then other lengths and batches.
SHAPES = [(2, 5), (3, 9), (1, 12)]


def hidden(batch: int, seq: int, embed: int = E, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seq, embed, generator=torch.Generator().manual_seed(seed + seq))


def hidden_inputs(batch: int, seq: int) -> tuple[tuple, dict]:
    return (hidden(batch, seq),), {}


def capture(model: nn.Module, *args, dynamic: bool = True, require_attention: bool = True,
            **kwargs) -> rw.Program:
    return rw.capture(model, args, kwargs or None, dynamic=dynamic,
                      require_attention=require_attention)


def canonical_nodes(prog: rw.Program) -> list[torch.fx.Node]:
    return [n for n in prog.module.graph.nodes
            if n.op == "call_function" and n.target is ATTENTION]


def leftover_attention_ops(prog: rw.Program) -> list[torch.fx.Node]:
    """softmax / sdpa nodes still in the canonicalized graph."""
    return [n for n in prog.module.graph.nodes
            if n.op == "call_function" and (n.target in SOFTMAX or n.target is SDPA)]


def only_site(prog: rw.Program) -> rw.AttentionSite:
    assert len(prog.sites) == 1, [s.pattern for s in prog.sites]
    site = prog.sites[0]
    by_name = {n.name: n for n in canonical_nodes(prog)}
    assert site.node in by_name, f"canonical node {site.node!r} not in the graph"
    return site


def assert_numeric(prog: rw.Program, model: nn.Module,
                   make_inputs: Callable[[int, int], tuple[tuple, dict]] = hidden_inputs,
                   shapes=SHAPES, tol: float = TOL) -> None:
    """The canonicalized module equals the model (and the captured graph) at every shape."""
    for batch, seq in shapes:
        args, kwargs = make_inputs(batch, seq)
        report = prog.verify(model, args, kwargs)
        assert report.max_rel <= tol, f"(batch={batch}, seq={seq}): {report}"
        report = prog.verify(None, args, kwargs)
        assert report.max_rel <= tol, f"vs captured graph (batch={batch}, seq={seq}): {report}"


def rejection_reasons(model: nn.Module, *args, dynamic: bool = True, **kwargs) -> list[str]:
    """The model has no attention: capture raises, and the softmax/sdpa is rejected with a
    reason (returned, one per rejected anchor)."""
    with pytest.raises(rw.NoAttentionError):
        capture(model, *args, dynamic=dynamic, **kwargs)
    prog = capture(model, *args, dynamic=dynamic, require_attention=False, **kwargs)
    assert prog.sites == []
    assert prog.rejected, "no anchor was rejected"
    assert all(r.reason for r in prog.rejected)
    return [r.reason for r in prog.rejected]


def to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    b, s, _ = t.shape
    return t.view(b, s, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H * D]."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


class Attn(nn.Module):
    """q/k/v/o linear projections around ``core(q, k, v) -> [B, H, S, Dv]`` (q [B, H, S, D],
    k and v [B, Hkv, S, D]). A core may return ``(out, *extra)``; the extras are returned too."""

    def __init__(self, core: Callable, heads: int = H, kv_heads: int | None = None,
                 head_dim: int = D, embed: int = E, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.q_proj = nn.Linear(embed, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed, self.kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed, self.kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, embed, bias=bias)
        self.core = core
        self.eval()

    def forward(self, x: torch.Tensor):
        q = to_heads(self.q_proj(x), self.heads)
        k = to_heads(self.k_proj(x), self.kv_heads)
        v = to_heads(self.v_proj(x), self.kv_heads)
        out = self.core(q, k, v)
        if isinstance(out, tuple):
            return (self.o_proj(merge_heads(out[0])), *out[1:])
        return self.o_proj(merge_heads(out))


def causal_keep(s: int, device=None) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


# --- the zoo, captured once per process ------------------------------------------------------


@dataclass
class Captured:
    entry: object
    model: nn.Module
    prog: rw.Program
    args: tuple
    kwargs: dict


CAPTURE_SHAPE = (2, 7)
OTHER_SHAPES = [(3, 9), (2, 13)]


@functools.cache
def captured_zoo(name: str) -> Captured:
    from zoo import get

    entry = get(name)
    model = entry.build()
    args, kwargs = entry.inputs(*CAPTURE_SHAPE)
    prog = rw.capture(model, args, kwargs)
    return Captured(entry, model, prog, args, kwargs)
