"""`KernelSpec`: what one generated kernel is specialized to, and whether we can generate it.

A kernel is specialized to everything that changes its code: head dims, the GQA ratio, the
dtype, is_causal, softcap on/off, the kind of attn_mask, and the static sparsity pattern
(window, sink, dilation, or a per-head window table; or a grid neighbourhood: kernel size,
dilation, grid dims, global tokens). Shapes (B, Hq, Hkv, Sq, Sk), the scale and the softcap
value are runtime arguments; tile sizes are constexpr launch arguments.

Grid dims are written into the kernel as constants, like window sizes: they are part of the
site's sparsity string (static per site; a model has one grid), and as constants the per-element
div/mod by them compiles to multiply-shift and the tile band arithmetic folds.

Shape glossary: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Sq queries,
Sk keys, D head dim of q/k, Dv head dim of v.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec

GENERATOR_VERSION = 2  # bump when the template changes: old cache entries are then unused
MAX_HEAD_DIM = 256
MAX_PACKED_HEADS = 16  # query heads of one KV head packed into one tile (a divisor of G)
FULL_WINDOW = 1 << 30  # per-head table entry of a full-attention head: "window" = everything

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASK_KINDS = ("none", "float", "bool")


@dataclass(frozen=True)
class KernelSpec:
    head_dim: int
    v_head_dim: int
    group: int  # G = Hq // Hkv
    dtype: str  # "fp32" | "fp16" | "bf16"
    causal: bool  # is_causal: top-left aligned
    softcap: bool
    mask: str  # attn_mask kind: "none" | "float" | "bool"
    window: int | None = None  # uniform window (bottom-right aligned); None = dense
    per_head: bool = False  # windows come from a per-query-head table argument
    sink: int = 0
    dilation: int = 1
    neighborhood: int | None = None  # kernel size K of a grid neighbourhood (rewriter.ir.masks)
    grid: tuple[int, ...] | None = None  # (H, W) or (T, H, W), row-major
    globals_: int = 0  # tokens before the grid
    alibi: bool = False  # ALiBi: + slope[head] * key index, slopes from argument Slopes

    # --- naming --------------------------------------------------------------------------

    @property
    def heads_per_tile(self) -> int:
        """P: the largest divisor of G that fits a tile's rows (P query heads share K/V)."""
        return max(p for p in range(1, min(self.group, MAX_PACKED_HEADS) + 1)
                   if self.group % p == 0)

    @property
    def windowed(self) -> bool:
        return self.window is not None or self.per_head

    @property
    def name(self) -> str:
        """A name that says what the kernel does, e.g. attn_fwd_d64_g3_win256_sink4_causal."""
        parts = [f"attn_fwd_d{self.head_dim}"]
        if self.v_head_dim != self.head_dim:
            parts[0] += f"v{self.v_head_dim}"
        parts.append(f"g{self.group}")
        if self.neighborhood is not None:
            parts.append(f"nbhd{self.neighborhood}_grid{'x'.join(map(str, self.grid))}")
            if self.globals_:
                parts.append(f"glob{self.globals_}")
        if self.per_head:
            parts.append("headwin")
        elif self.window is not None:
            parts.append(f"win{self.window}")
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.dilation > 1:
            parts.append(f"dil{self.dilation}")
        if self.causal:
            parts.append("causal")
        if self.softcap:
            parts.append("softcap")
        if self.mask != "none":
            parts.append(f"{self.mask}mask")
        if self.alibi:
            parts.append("alibi")
        parts.append(self.dtype)
        return "_".join(parts)

    @property
    def key(self) -> str:
        """Cache key: a hash of the specialization and the generator version."""
        fields = asdict(self)
        if not self.alibi:  # kernels without ALiBi keep the keys they had before it existed
            del fields["alibi"]
        text = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key, **asdict(self)}

    # --- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, *, head_dim: int, v_head_dim: int, group: int, dtype: torch.dtype,
               causal: bool, softcap: float, mask: str, sparsity: str,
               alibi: bool = False) -> KernelSpec:
        """Raises SpecError (with the reason) for what the generator does not serve."""
        if dtype not in DTYPES:
            raise SpecError(f"dtype {dtype} (supported: fp32, fp16, bf16)")
        for what, d in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if not 1 <= d <= MAX_HEAD_DIM:
                raise SpecError(f"{what} {d} > {MAX_HEAD_DIM}")
        if group < 1:
            raise SpecError(f"GQA ratio {group}")
        if mask not in MASK_KINDS:
            raise SpecError(f"attn_mask kind {mask!r}")
        spec = MaskSpec.parse(sparsity)
        if spec.neighborhood is not None:
            return cls(head_dim=head_dim, v_head_dim=v_head_dim, group=group,
                       dtype=DTYPES[dtype], causal=bool(causal), softcap=softcap > 0, mask=mask,
                       dilation=spec.dilation, neighborhood=spec.neighborhood, grid=spec.grid,
                       globals_=spec.globals_, alibi=bool(alibi))
        window = per_head = None
        if not spec.is_dense:
            per_head = spec.heads is not None
            window = None if per_head else spec.window
        return cls(head_dim=head_dim, v_head_dim=v_head_dim, group=group,
                   dtype=DTYPES[dtype], causal=bool(causal), softcap=softcap > 0, mask=mask,
                   window=window, per_head=bool(per_head),
                   sink=0 if spec.is_dense else spec.sink,
                   dilation=1 if spec.is_dense else spec.dilation, alibi=bool(alibi))


def mask_kind(attn_mask) -> str:
    """"none", "bool" or "float" for an attn_mask tensor (real or fake) or None."""
    if attn_mask is None:
        return "none"
    return "bool" if attn_mask.dtype == torch.bool else "float"


def head_windows(sparsity: str, num_heads: int) -> list[int]:
    """[Hq] window per query head for a per-head table (full heads get FULL_WINDOW)."""
    windows = MaskSpec.parse(sparsity).head_windows(num_heads).tolist()
    return [FULL_WINDOW if w == 0 else int(w) for w in windows]


def kernel_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v, out) as the kernels read them: last dim contiguous, K/V in q's dtype, and an
    empty out [B, Hq, Sq, Dv]."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    return q, k, v, q.new_empty((*q.shape[:3], v.shape[-1]))


def mask_view(attn_mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """attn_mask as the [B, Hq, Sq, Sk] broadcast view kernels index by strides (stride 0 on
    broadcast dims, nothing copied); a bool mask reads as uint8."""
    mask = attn_mask.expand(*shape)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
