"""Static sparse masks: the ``sparsity`` attribute of ``rewriter.attention``.

A `MaskSpec` says which keys each query may read, on top of the model's own mask (the two are
ANDed). Positions are absolute: with Sq queries over Sk keys, query i sits at position
``i + Sk - Sq`` (bottom-right alignment, as when decoding with a KV cache).

    window=W     keep keys with |pos_q - pos_k| < W (with a causal model: the last W tokens)
    sink=S       and always keep the first S keys (attention sinks)
    dilation=D   inside the window keep every D-th key (pos_q - pos_k divisible by D)
    heads=T      per-head table, one entry per query head: "f" full attention, "s" the
                 pattern above; written as letters (heads=ffss) or, when heads use
                 their own windows, slash-separated with window sizes (heads=f/64/s/256)

Neighbourhood attention on a vision token grid (NATTEN's non-causal, stride-1 definition),
instead of window/sink/heads:

    neighborhood=K   odd kernel size K >= 1 per axis
    dilation=D       per axis, positions are split into D interleaved sub-grids
                     (coordinate % D); a query sees keys of its own sub-grid only
    grid=HxW         the token grid, row-major (TxHxW for video: frames, rows, columns)
    global=N         N global tokens come first (ViT's CLS: global=1), then the grid

Tokens: position p < N is global; position p >= N is grid cell p - N, coordinates (t, r, c)
row-major. A global query sees every key and every query sees the global keys. A grid query
sees a grid key when, on every axis, with x / y the query / key coordinate, L the axis length:
x % D == y % D (same sub-grid), and y // D lies in [s, s + K) where, on the sub-grid's
coordinates x' = x // D over its length L' = ceil((L - x % D) / D),

    s = max(0, min(x' - K // 2, L' - K))

i.e. the K sub-grid positions centred on the query, shifted inward at the borders so that a
query sees exactly K of them per axis (NATTEN: natten/backends/flex.py, get_na_flex_mask: the
window centre clamp(x', K//2, L'-1-K//2); dilation groups and their corrected lengths). NATTEN
requires L >= K * D; here a sub-grid shorter than K is seen whole. The site must have exactly
N + prod(grid) keys (a SpecError otherwise).

String form: comma-separated ``key=value`` in the order above, e.g. ``window=256,sink=4`` or
``neighborhood=7,dilation=2,grid=14x14,global=1``. The empty string is dense attention.

Shape glossary: H query heads, Sq queries, Sk keys, Tq x Tk a tile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from rewriter.errors import SpecError
from rewriter.ir.specs import attribute_int, attribute_items, grid_shape

EMPTY, PARTIAL, FULL = 0, 1, 2
_KEYS = ("window", "sink", "dilation", "heads", "neighborhood", "grid", "global")


@dataclass(frozen=True)
class MaskSpec:
    window: int | None = None
    sink: int = 0
    dilation: int = 1
    heads: str | None = None  # per-query-head table: "ffss" or "f/64/s/256" (see above)
    neighborhood: int | None = None  # kernel size K of a grid neighbourhood (see above)
    grid: tuple[int, ...] | None = None  # (H, W) or (T, H, W), row-major
    globals_: int = 0  # N global tokens before the grid (string key: global)

    def __post_init__(self):
        if self.neighborhood is not None or self.grid is not None or self.globals_:
            self._check_neighborhood()
            return
        if self.window is not None and self.window < 1:
            raise SpecError(f"mask window={self.window}: must be a positive integer")
        if self.sink < 0:
            raise SpecError(f"mask sink={self.sink}: must be >= 0")
        if self.dilation < 1:
            raise SpecError(f"mask dilation={self.dilation}: must be >= 1")
        if self.dilation > 1 and self.window is None:
            raise SpecError("mask dilation needs a window (or a neighborhood)")
        if self.heads is not None:
            entries = _head_entries(self.heads)
            if not entries or any(e not in ("f", "s") and not (e.isdigit() and int(e) > 0)
                                  for e in entries):
                raise SpecError(f"mask heads={self.heads!r}: one entry per head, f or s "
                                "(or a window size, slash-separated)")
            if self.window is None:
                raise SpecError("mask heads= needs a window")

    def _check_neighborhood(self):
        if self.neighborhood is None:
            raise SpecError("mask grid= and global= go with neighborhood=K")
        if self.neighborhood < 1 or self.neighborhood % 2 == 0:
            raise SpecError(f"mask neighborhood={self.neighborhood}: must be an odd positive "
                            "integer (the kernel size per axis)")
        if self.window is not None or self.sink or self.heads is not None:
            raise SpecError("mask neighborhood= excludes window=, sink= and heads=")
        if self.grid is None:
            raise SpecError("mask neighborhood needs grid=HxW or grid=TxHxW")
        if len(self.grid) not in (2, 3) or min(self.grid) < 1:
            raise SpecError(f"mask grid={_grid_text(self.grid)}: 2 or 3 positive sizes")
        if self.dilation < 1:
            raise SpecError(f"mask dilation={self.dilation}: must be >= 1")
        if self.globals_ < 0:
            raise SpecError(f"mask global={self.globals_}: must be >= 0")

    # --- text form ------------------------------------------------------------------------

    @classmethod
    @functools.lru_cache(maxsize=256)  # eager ops parse their spec attribute on every call
    def parse(cls, text: str) -> MaskSpec:
        if not text:
            return cls()
        values: dict = {}
        for key, value in attribute_items(text, _KEYS, "mask spec"):
            if key == "heads":
                values[key] = value
            elif key == "grid":
                try:
                    values[key] = grid_shape(value)
                except ValueError:
                    raise SpecError(f"mask spec {text!r}: grid={value!r} is not HxW or TxHxW "
                                    "(positive sizes)") from None
            else:
                values[key] = attribute_int(text, key, value, "mask spec")
        if "global" in values:
            values["globals_"] = values.pop("global")
        return cls(**values)

    def format(self) -> str:
        if self.neighborhood is not None:
            parts = [f"neighborhood={self.neighborhood}"]
            if self.dilation != 1:
                parts.append(f"dilation={self.dilation}")
            parts.append(f"grid={_grid_text(self.grid)}")
            if self.globals_:
                parts.append(f"global={self.globals_}")
            return ",".join(parts)
        parts = []
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.sink:
            parts.append(f"sink={self.sink}")
        if self.dilation != 1:
            parts.append(f"dilation={self.dilation}")
        if self.heads is not None:
            parts.append(f"heads={self.heads}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.format() or "dense"

    @property
    def tokens(self) -> int | None:
        """N + prod(grid): the token count a neighbourhood mask is defined over (else None)."""
        if self.grid is None:
            return None
        return self.globals_ + math.prod(self.grid)

    @property
    def is_dense(self) -> bool:
        if self.neighborhood is not None:
            return False
        return self.window is None or (
            self.heads is not None and all(e == "f" for e in _head_entries(self.heads)))

    def within(self, window: int) -> MaskSpec:
        """This mask ANDed with a causal sliding window of ``window`` keys (the model's own),
        as one spec; SpecError when no spec says exactly that."""
        own = f"the model's own sliding window ({window} keys)"
        if self.neighborhood is not None:
            raise SpecError(f"a neighbourhood mask cannot be combined with {own}")
        if self.window is None:
            return MaskSpec(window=window)
        listed = self.window_list(len(_head_entries(self.heads)) if self.heads else 1)
        wide = window + 1  # stands for a full-attention head: wider than the model's window
        heads = [w or wide for w in listed]
        if self.sink:
            # sink keys outside the model's window are dropped, inside it they are kept anyway:
            # exact only when every head's window covers the model's (then it is the model's)
            if min(heads) < window or self.dilation > 1:
                raise SpecError(f"sink={self.sink} with a window shorter than {own}, or with a "
                                "dilation, keeps keys the model does not: no single mask "
                                "says both (drop sink=, or widen the window)")
            return MaskSpec(window=window)
        if self.dilation > 1 and 0 in listed:
            raise SpecError(f"dilation={self.dilation} with full-attention heads: {own} on "
                            "those heads and a dilated window on the others is no single mask")
        merged = [min(w, window) for w in heads]
        if len(set(merged)) == 1:
            return MaskSpec(window=merged[0], dilation=self.dilation)
        return MaskSpec(window=max(merged), dilation=self.dilation,
                        heads=head_table(list(merged), max(merged)))

    # --- evaluation -----------------------------------------------------------------------

    def head_windows(self, num_heads: int) -> torch.Tensor:
        """[H] int64: each head's window; 0 marks a full-attention head."""
        return torch.tensor(self.window_list(num_heads), dtype=torch.long)

    def window_list(self, num_heads: int) -> list[int]:
        """head_windows as Python ints (usable under fake tensors)."""
        if self.heads is None:
            return [self.window or 0] * num_heads
        entries = _head_entries(self.heads)
        if len(entries) != num_heads:
            raise SpecError(f"mask heads={self.heads!r} has {len(entries)} entries for "
                            f"{num_heads} heads")
        return [0 if e == "f" else self.window if e == "s" else int(e) for e in entries]

    def mask_mod(self, b, h, q_idx, kv_idx, *, offset: int = 0, windows=None):
        """Broadcasting keep-predicate on index tensors (FlexAttention's mask_mod signature).

        ``offset`` = Sk - Sq places query i at position i + offset; ``windows`` is
        head_windows(H) when the spec has a per-head table."""
        if self.neighborhood is not None:
            return self._neighborhood_keep(q_idx + offset, kv_idx)
        if self.window is None:
            return torch.ones_like(q_idx + kv_idx, dtype=torch.bool)
        dist = (q_idx + offset) - kv_idx
        window = windows[h] if windows is not None else self.window
        keep = dist.abs() < window
        if self.dilation > 1:
            keep = keep & (dist.remainder(self.dilation) == 0)
        if self.sink:
            keep = keep | (kv_idx < self.sink)
        if windows is not None:
            keep = keep | (window == 0)
        return keep

    def _neighborhood_keep(self, q_pos, kv_idx):
        """The neighbourhood predicate on absolute positions (module docstring)."""
        n, k, d = self.globals_, self.neighborhood, self.dilation
        q_cell = (q_pos - n).clamp_min(0)  # globals get cell 0; the OR below overrides them
        k_cell = (kv_idx - n).clamp_min(0)
        keep = (q_pos < n) | (kv_idx < n)
        in_reach = None
        stride = math.prod(self.grid)
        for length in self.grid:  # outermost axis first (row-major)
            stride //= length
            x, y = (q_cell // stride) % length, (k_cell // stride) % length
            same = (x % d) == (y % d)  # dilation: one sub-grid per x % d
            sub_len = (length - x % d + d - 1) // d  # its length on this axis
            start = (torch.minimum(x // d - k // 2, sub_len - k)).clamp_min(0)
            axis = same & (y // d >= start) & (y // d < start + k)
            in_reach = axis if in_reach is None else in_reach & axis
        return keep | in_reach

    def keep_at(self, pos_q: torch.Tensor, pos_k: torch.Tensor, num_heads: int = 1
                ) -> torch.Tensor:
        """[H, Sq, Sk] bool keep-mask for queries and keys at the absolute positions ``pos_q``
        [Sq] and ``pos_k`` [Sk] (H = 1 without a per-head table): what a bounded KV cache
        needs, whose keys are not 0..Sk-1 once it has evicted some."""
        q, k = pos_q.view(1, -1, 1), pos_k.view(1, 1, -1)
        if self.heads is None:
            return self.mask_mod(None, None, q, k)
        h = torch.arange(num_heads, device=pos_q.device).view(num_heads, 1, 1)
        windows = self.head_windows(num_heads).to(pos_q.device)
        return self.mask_mod(None, h, q, k, windows=windows)

    # --- bounded KV caches ----------------------------------------------------------------

    def head_bounds(self, num_heads: int) -> list[int | None]:
        """Per query head, the cached positions a causal decoder must keep for it: the sink
        plus the last W - 1 (query p reads keys p-W+1..p, so the next query needs the W - 1
        before it); None when the head reads everything (full, or not a sink+window mask)."""
        if self.neighborhood is not None or self.window is None:
            return [None] * num_heads
        return [None if w == 0 else self.sink + w - 1 for w in self.window_list(num_heads)]

    def kv_head_bounds(self, num_heads: int, num_kv_heads: int) -> list[int | None]:
        """head_bounds per KV head: the largest of its query heads' (None if any is full)."""
        per_q, group = self.head_bounds(num_heads), num_heads // num_kv_heads
        out = []
        for g in range(num_kv_heads):
            bounds = per_q[g * group:(g + 1) * group]
            out.append(None if None in bounds else max(bounds))
        return out

    def cache_bound(self, num_heads: int) -> int | None:
        """The cache positions every head of this mask needs (None: some head reads all)."""
        bounds = self.head_bounds(num_heads)
        return None if None in bounds else max(bounds)

    def kv_head_parts(self, num_heads: int, num_kv_heads: int
                      ) -> list[tuple[list[int], list[int], MaskSpec]] | None:
        """A per-head table as parts of whole KV heads, full ones and windowed ones: (query
        heads, KV heads, the part's mask) each, in order of first KV head. None when there is
        no table, a single part, or a KV head whose query heads fall in different parts."""
        if self.heads is None or self.neighborhood is not None:
            return None
        windows, group = self.window_list(num_heads), num_heads // num_kv_heads
        parts_of: dict[int | bool, list[int]] = {}
        for g in range(num_kv_heads):
            members = {w > 0 for w in windows[g * group:(g + 1) * group]}
            if len(members) > 1:
                return None
            parts_of.setdefault(members.pop(), []).append(g)
        if len(parts_of) < 2:
            return None
        parts = []
        for kv_heads in parts_of.values():
            q_heads = [g * group + j for g in kv_heads for j in range(group)]
            parts.append((q_heads, kv_heads, self.select_heads(q_heads, num_heads)))
        return parts

    def select_heads(self, heads: list[int], num_heads: int) -> MaskSpec:
        """The mask of the query heads ``heads`` (of ``num_heads``) alone, simplified: a
        table whose heads all share one entry becomes that entry."""
        if self.heads is None:
            return self
        all_windows = self.window_list(num_heads)
        windows = [all_windows[h] for h in heads]
        if all(w == 0 for w in windows):
            return MaskSpec()
        if all(w == windows[0] for w in windows):
            return MaskSpec(windows[0], self.sink, self.dilation)
        return MaskSpec(self.window, self.sink, self.dilation,
                        head_table([None if w == 0 else w for w in windows], self.window))

    def rows(self, start: int, stop: int, sq: int, sk: int, num_heads: int = 1,
             device=None) -> torch.Tensor:
        """[H, stop - start, Sk] bool: rows start..stop-1 of `dense` (H = 1 without a per-head
        table), without building the other rows."""
        if self.neighborhood is not None and (sk != self.tokens or sq > sk):
            raise SpecError(f"mask {self}: the grid and global tokens make {self.tokens} "
                            f"tokens, the attention has {sq} queries over {sk} keys")
        q = torch.arange(start, stop, device=device).view(1, stop - start, 1)
        k = torch.arange(sk, device=device).view(1, 1, sk)
        if self.heads is None:
            return self.mask_mod(None, None, q, k, offset=sk - sq)
        h = torch.arange(num_heads, device=device).view(num_heads, 1, 1)
        windows = self.head_windows(num_heads).to(device)
        return self.mask_mod(None, h, q, k, offset=sk - sq, windows=windows)

    def dense(self, sq: int, sk: int, num_heads: int = 1, device=None) -> torch.Tensor:
        """[H, Sq, Sk] bool keep-mask (H = 1 without a per-head table)."""
        return self.rows(0, sq, sq, sk, num_heads, device)

    def tile_map(self, sq: int, sk: int, tile_q: int, tile_k: int, *, num_heads: int = 1,
                 causal: bool = False) -> torch.Tensor:
        """[H, ceil(Sq/Tq), ceil(Sk/Tk)] int8: EMPTY (0), PARTIAL (1) or FULL (2) per tile,
        for this mask ANDed with causal (bottom-right aligned) when ``causal``."""
        keep = self.dense(sq, sk, num_heads)
        if causal:
            keep = keep & causal_mask(sq, sk)
        nq, nk = -(-sq // tile_q), -(-sk // tile_k)
        padded = torch.zeros(keep.shape[0], nq * tile_q, nk * tile_k, dtype=torch.int32)
        valid = torch.zeros_like(padded)
        padded[:, :sq, :sk] = keep.to(torch.int32)
        valid[:, :sq, :sk] = 1
        tiles = padded.view(-1, nq, tile_q, nk, tile_k).sum(dim=(2, 4))
        sizes = valid.view(-1, nq, tile_q, nk, tile_k).sum(dim=(2, 4))
        out = torch.full_like(tiles, PARTIAL, dtype=torch.int8)
        out[tiles == 0] = EMPTY
        out[tiles == sizes] = FULL
        return out

    def density(self, sq: int, sk: int, *, num_heads: int = 1, causal: bool = False) -> float:
        """Kept fraction of the (causal, when asked) score matrix, averaged over heads."""
        keep = self.dense(sq, sk, num_heads)
        if causal:
            base = causal_mask(sq, sk)
            return float((keep & base).sum() / (base.sum() * keep.shape[0]))
        return float(keep.float().mean())


def _grid_text(grid: tuple[int, ...]) -> str:
    return "x".join(str(g) for g in grid)


def _head_entries(heads: str) -> list[str]:
    return heads.split("/") if "/" in heads else list(heads)


def head_table(entries: list[int | None], window: int) -> str:
    """Per-head table text: None = full, an int = that head's window."""
    letters = ["f" if e is None else "s" if e == window else str(e) for e in entries]
    if all(len(x) == 1 for x in letters):
        return "".join(letters)
    return "/".join(letters)


def causal_mask(sq: int, sk: int) -> torch.Tensor:
    """[Sq, Sk] bool, bottom-right aligned (query i sees keys up to i + Sk - Sq)."""
    q = torch.arange(sq).view(sq, 1) + (sk - sq)
    return torch.arange(sk).view(1, sk) <= q
