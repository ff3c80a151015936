"""Triton source for one `KernelSpec`: a flash-attention forward with online softmax.

The emitted file holds two functions: ``_attend_tile`` (scores, masking and the online softmax
update for one KV tile; ``MASKED`` picks the partial-tile variant) and the kernel, named by its
specialization. Only the lines a specialization needs are emitted, with its constants written
in, so the file reads like a hand-written kernel for that variant.

Work split: program (pid_m, pid_bh) owns one KV head ``kvh`` of batch ``b`` and a tile of
BLOCK_M rows; row r is query ``pid_m * QB + r // P`` of query head ``kvh * G + hg * P + r % P``
(P query heads of one KV head share every K/V tile they load; QB = BLOCK_M // P).

KV tiles visited per query tile, in closed form (keys, exclusive bounds):
  sink tiles   [0, sink_end)            keys < sink, masked
  band         [lo, hi)                 what causal (top-left), the window (bottom-right) and
                                        the key length let any row of the tile reach
  full tiles   [full_lo, full_hi)       inside the band for every row: no mask arithmetic

A grid neighbourhood (rewriter.ir.masks: N global tokens, then a row-major grid) visits
  global tiles [0, glob_end)            keys < N, masked
  grid band    [lo, hi)                 the whole grid rows (frames, for TxHxW) that the
                                        neighbourhoods of the tile's queries reach on the
                                        outermost axis (`neighborhood_band`), every key of a
                                        tile with a global query; every tile masked
"""

from __future__ import annotations

import json
import math

from rewriter.codegen.triton.spec import FULL_WINDOW, KernelSpec


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_dim(d: int) -> int:
    return max(16, next_pow2(d))  # tl.dot needs >= 16; padded lanes load zeros


def _band_lines(spec: KernelSpec) -> list[str]:
    """Statements from first_g, last_g (grid cells of the tile's first and last query, >= 0)
    to band_lo, band_hi: the keys [band_lo, band_hi) of the grid rows (outermost axis) their
    neighbourhoods reach. MIN/MAX stand for min/max (Python) or tl.minimum/tl.maximum (kernel),
    so the kernel and `neighborhood_band` run the same arithmetic. Exact hull: with dilation D,
    a sub-grid's window start only grows along the axis, so the lowest key comes from one of
    the first D queries (one per sub-grid) and the highest from one of the last D."""
    length, kernel, dil, n = spec.grid[0], spec.neighborhood, spec.dilation, spec.globals_
    inner, half = math.prod(spec.grid[1:]), spec.neighborhood // 2
    out = [f"x0 = first_g // {inner}  # outermost coordinates of the first and last query",
           f"x1 = last_g // {inner}"]
    if dil == 1:
        out += [f"y_lo = MAX(MIN(x0 - {half}, {length - kernel}), 0)",
                f"y_hi = MIN(MAX(MIN(x1 - {half}, {length - kernel}), 0) + {kernel}, {length})"]
    else:
        out += [f"y_lo = {length}", "y_hi = 0"]
        for d in range(dil):
            out += [f"x = MIN(x0 + {d}, x1)",
                    f"g = x % {dil}",
                    f"n_g = ({length + dil - 1} - g) // {dil}  # positions of x's sub-grid",
                    f"y_lo = MIN(y_lo, g + {dil} * MAX(MIN(x // {dil} - {half}, n_g - {kernel}),"
                    " 0))",
                    f"x = MAX(x1 - {d}, x0)",
                    f"g = x % {dil}",
                    f"n_g = ({length + dil - 1} - g) // {dil}",
                    f"start = MAX(MIN(x // {dil} - {half}, n_g - {kernel}), 0)",
                    f"y_hi = MAX(y_hi, g + {dil} * (MIN(start + {kernel}, n_g) - 1) + 1)"]
    out += [f"band_lo = {n} + y_lo * {inner}", f"band_hi = {n} + y_hi * {inner}"]
    return out


def neighborhood_band(spec: KernelSpec, first_g: int, last_g: int) -> tuple[int, int]:
    """Keys [lo, hi) of the grid rows that the neighbourhoods of grid cells first_g..last_g
    reach (the kernel's band, same arithmetic)."""
    scope = {"MIN": min, "MAX": max, "first_g": first_g, "last_g": last_g}
    exec("\n".join(_band_lines(spec)), scope)  # noqa: S102  (our own generated arithmetic)
    return scope["band_lo"], scope["band_hi"]


def visited_tiles(spec: KernelSpec, sq: int, sk: int, block_m: int, block_n: int) -> int:
    """KV tiles a neighbourhood kernel visits over all query tiles (one head group), from the
    same bounds as the kernel (no causal): global tiles plus the grid band."""
    qb = block_m // spec.heads_per_tile
    n, offset, total = spec.globals_, sk - sq, 0
    glob_end = -(-min(sk, n) // block_n) * block_n
    for first in range(0, sq, qb):
        last = min(first + qb, sq) - 1
        lo, hi = 0, sk
        if first + offset >= n:
            lo, hi = neighborhood_band(spec, first + offset - n, last + offset - n)
            lo, hi = lo // block_n * block_n, min(hi, sk)
        lo = max(lo, glob_end)
        total += glob_end // block_n + max(0, -(-(hi - lo) // block_n))
    return total


def generate(spec: KernelSpec) -> str:
    """The Python/Triton source of the kernel for ``spec``."""
    return "\n".join([_header(spec), _tile_fn(spec), _kernel_fn(spec)]) + "\n"


def _describe(spec: KernelSpec) -> str:
    mask = {"none": "no attn_mask", "float": "additive float attn_mask",
            "bool": "boolean attn_mask (True = attend)"}[spec.mask]
    if spec.neighborhood is not None:
        sparsity = (f"neighbourhood {spec.neighborhood} on grid "
                    f"{'x'.join(map(str, spec.grid))}, {spec.globals_} global token(s)")
    elif spec.per_head:
        sparsity = "per-head window table (argument Windows)"
    elif spec.window is not None:
        sparsity = f"window {spec.window}"
    else:
        sparsity = "dense"
    if spec.sink:
        sparsity += f", sink {spec.sink}"
    if spec.dilation > 1:
        sparsity += f", dilation {spec.dilation}"
    return (f"head_dim {spec.head_dim}, v_head_dim {spec.v_head_dim}, {spec.group} query "
            f"head(s) per KV head ({spec.heads_per_tile} packed per tile), {spec.dtype},\n"
            f"{'is_causal (top-left)' if spec.causal else 'not causal'}, sparsity: "
            f"{sparsity} (bottom-right), {mask}, "
            f"{'softcap' if spec.softcap else 'no softcap'}"
            f"{', ALiBi (+ slope[head] * key index, argument Slopes)' if spec.alibi else ''}.")


def _header(spec: KernelSpec) -> str:
    return f'''"""{spec.name}: generated by rewriter.codegen.triton (regenerated on demand;
edits are overwritten). Forward only.

{_describe(spec)}

Shapes: q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> out [B, Hq, Sq, Dv]
(last dim contiguous); attn_mask is read through the strides of its [B, Hq, Sq, Sk]
broadcast view (stride 0 on broadcast dims). Query i sits at position i + Sk - Sq.
"""
# rewriter-kernel: {json.dumps(spec.to_dict(), sort_keys=True)}

import triton
import triton.language as tl

HEAD_DIM = tl.constexpr({spec.head_dim})
V_HEAD_DIM = tl.constexpr({spec.v_head_dim})
BLOCK_D = tl.constexpr({block_dim(spec.head_dim)})
BLOCK_DV = tl.constexpr({block_dim(spec.v_head_dim)})
GROUP = tl.constexpr({spec.group})  # query heads per KV head
HEADS_PER_TILE = tl.constexpr({spec.heads_per_tile})
HEAD_GROUPS = tl.constexpr({spec.group // spec.heads_per_tile})  # tiles per KV head and row block
'''


def _tile_fn(spec: KernelSpec) -> str:
    pad_d = block_dim(spec.head_dim) != spec.head_dim
    pad_dv = block_dim(spec.v_head_dim) != spec.v_head_dim
    params = ["acc, l_i, m_i, q, start_n,",
              "K_tile, V_tile, stride_kn, stride_vn,  # K/V of this (b, kv head) at key 0"]
    if spec.mask != "none":
        params.append("mask_rows, stride_mk,  # [BLOCK_M, 1] pointers to attn_mask rows")
    params.append("row_ok, q_idx,  # [BLOCK_M]: valid rows, query index of each row")
    if spec.per_head:
        params.append("win,  # [BLOCK_M] window of each row's head")
    if spec.alibi:
        params.append("slope,  # [BLOCK_M] ALiBi slope of each row's head")
    params.append("Sk, offset, scale, softcap,")
    params.append("BLOCK_N: tl.constexpr, MASKED: tl.constexpr,")
    out = ["@triton.jit", "def _attend_tile("]
    out += [f"    {p}" for p in params]
    out += ["):",
            '    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i).',
            '    MASKED=False: a tile every row reads in full (no mask arithmetic)."""',
            "    offs_n = start_n + tl.arange(0, BLOCK_N)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_dv = tl.arange(0, BLOCK_DV)",
            "    k_ptrs = K_tile + offs_n[None, :] * stride_kn + offs_d[:, None]  # k^T [D, N]",
            "    v_ptrs = V_tile + offs_n[:, None] * stride_vn + offs_dv[None, :]  # v [N, Dv]"]
    k_lanes = "offs_d[:, None] < HEAD_DIM" if pad_d else None
    v_lanes = "offs_dv[None, :] < V_HEAD_DIM" if pad_dv else None
    out += ["    if MASKED:",
            "        in_range = offs_n < Sk",
            "        k_t = " + _load("k_ptrs", _and("in_range[None, :]", k_lanes)),
            "    else:",
            "        k_t = " + _load("k_ptrs", k_lanes)]
    dot_kw = ', input_precision="ieee"' if spec.dtype == "fp32" else ""
    out.append(f"    s = tl.dot(q, k_t{dot_kw})  # fp32 [BLOCK_M, BLOCK_N]")
    if spec.softcap:
        out += ["    # softcap * tanh(s * scale / softcap), tanh(x) = 2 sigmoid(2x) - 1",
                "    s = softcap * (2.0 * tl.sigmoid(s * (2.0 * scale / softcap)) - 1.0)"]
    else:
        out.append("    s = s * scale")
    if spec.alibi:
        out.append("    s = s + slope[:, None] * offs_n[None, :].to(tl.float32)  # ALiBi")
    if spec.mask != "none":
        m_mask = "row_ok[:, None] & in_range[None, :]"
        load_masked = _load("mask_rows + offs_n[None, :] * stride_mk", m_mask)
        load_full = _load("mask_rows + offs_n[None, :] * stride_mk", "row_ok[:, None]")
        out += ["    if MASKED:", f"        m = {load_masked}",
                "    else:", f"        m = {load_full}"]
        if spec.mask == "float":
            out.append("    s = s + m.to(tl.float32)")
        else:
            out.append('    s = tl.where(m != 0, s, float("-inf"))')
    out += ["    if MASKED:", "        keep = in_range[None, :]"]
    if spec.causal:
        out.append("        keep &= offs_n[None, :] <= q_idx[:, None]  # is_causal: top-left")
    if spec.windowed:
        w = "win[:, None]" if spec.per_head else str(spec.window)
        out += ["        dist = (q_idx[:, None] + offset) - offs_n[None, :]  # query pos - key pos",
                f"        band = (dist < {w}) & (dist > -{w})"]
        if spec.dilation > 1:
            out.append(f"        band &= dist % {spec.dilation} == 0")
        if spec.sink:
            out.append(f"        band |= offs_n[None, :] < {spec.sink}  # attention sinks")
        out.append("        keep &= band")
    if spec.neighborhood is not None:
        out += _neighborhood_keep(spec)
    out += ['        s = tl.where(keep, s, float("-inf"))',
            "    # Online softmax. m_safe: a row with no key so far has m = -inf.",
            "    m_new = tl.maximum(m_i, tl.max(s, 1))",
            '    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)',
            "    alpha = tl.exp(m_i - m_safe)",
            "    p = tl.exp(s - m_safe[:, None])",
            "    l_i = l_i * alpha + tl.sum(p, 1)",
            "    if MASKED:",
            "        v = " + _load("v_ptrs", _and("in_range[:, None]", v_lanes)),
            "    else:",
            "        v = " + _load("v_ptrs", v_lanes),
            f"    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v{dot_kw})",
            "    return acc, l_i, m_new", "", ""]
    return "\n".join(out)


def _kernel_fn(spec: KernelSpec) -> str:
    pad_d = block_dim(spec.head_dim) != spec.head_dim
    pad_dv = block_dim(spec.v_head_dim) != spec.v_head_dim
    args = ["Q, K, V, Out,"]
    if spec.mask != "none":
        args.append("Mask, stride_mb, stride_mh, stride_ms, stride_mk,")
    if spec.per_head:
        args.append("Windows,  # [Hq] int32 window per query head")
    if spec.alibi:
        args.append("Slopes,  # [Hq] fp32 ALiBi slope per query head")
    args += ["stride_qb, stride_qh, stride_qs,",
             "stride_kb, stride_kh, stride_ks,",
             "stride_vb, stride_vh, stride_vs,",
             "stride_ob, stride_oh, stride_os,",
             "Sq, Sk, H_KV, scale, softcap,",
             "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,"]
    # Sq and Sk stay runtime values (no "== 1" constexpr specialization): the bounds below
    # mix them with tile indices.
    out = ['@triton.jit(do_not_specialize=["Sq", "Sk"])', f"def {spec.name}("]
    out += [f"    {a}" for a in args]
    out += ["):",
            "    QB: tl.constexpr = BLOCK_M // HEADS_PER_TILE  # queries per tile",
            "    pid_m = tl.program_id(0)",
            "    pid_bh = tl.program_id(1)",
            "    b = pid_bh // (H_KV * HEAD_GROUPS)",
            "    kvh = (pid_bh // HEAD_GROUPS) % H_KV",
            "    hg = pid_bh % HEAD_GROUPS",
            "    rows = tl.arange(0, BLOCK_M)",
            "    q_idx = pid_m * QB + rows // HEADS_PER_TILE",
            "    head = kvh * GROUP + hg * HEADS_PER_TILE + rows % HEADS_PER_TILE",
            "    row_ok = (rows < QB * HEADS_PER_TILE) & (q_idx < Sq)",
            "    offset = Sk - Sq  # bottom-right alignment of the sparsity pattern",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_dv = tl.arange(0, BLOCK_DV)",
            "    b64 = b.to(tl.int64)",
            "    q_ptrs = (Q + b64 * stride_qb + head[:, None] * stride_qh"
            " + q_idx[:, None] * stride_qs\n              + offs_d[None, :])",
            "    q = " + _load("q_ptrs", _and("row_ok[:, None]", "offs_d[None, :] < HEAD_DIM"
                                            if pad_d else None)),
            "    K_tile = K + b64 * stride_kb + kvh * stride_kh",
            "    V_tile = V + b64 * stride_vb + kvh * stride_vh"]
    if spec.mask != "none":
        out.append("    mask_rows = Mask + b64 * stride_mb + head[:, None] * stride_mh"
                   " + q_idx[:, None] * stride_ms")
    if spec.per_head:
        out += [f"    win = tl.load(Windows + head, mask=row_ok, other={FULL_WINDOW})",
                "    w_max = tl.max(tl.where(row_ok, win, 0), 0)",
                f"    w_min = tl.min(tl.where(row_ok, win, {FULL_WINDOW}), 0)"]
    if spec.alibi:
        out.append("    slope = tl.load(Slopes + head, mask=row_ok, other=0.0)")
    out += _ranges(spec)
    out += ["    m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)",
            "    l_i = tl.zeros([BLOCK_M], tl.float32)",
            "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)"]
    call = ("acc, l_i, m_i = _attend_tile(\n"
            "            acc, l_i, m_i, q, start_n, K_tile, V_tile, stride_ks, stride_vs,\n"
            "            " + ("mask_rows, stride_mk, " if spec.mask != "none" else "")
            + "row_ok, q_idx, " + ("win, " if spec.per_head else "")
            + ("slope, " if spec.alibi else "")
            + "Sk, offset, scale, softcap, BLOCK_N, MASKED={masked})")
    loops = []
    if spec.sink:
        loops.append(("0", "sink_end", True, "sink tiles"))
    if spec.neighborhood is not None:
        if spec.globals_:
            loops.append(("0", "glob_end", True, "global key tiles"))
        loops.append(("lo", "hi", True, "grid band (every tile masked)"))
    elif not spec.windowed:
        loops += [("0", "full_hi", False, "full tiles"),
                  ("full_hi", "hi", True, "trailing partial tiles")]
    elif spec.dilation > 1:
        loops.append(("lo", "hi", True, "band (dilated: every tile is partial)"))
    else:
        loops += [("lo", "full_lo", True, "band, leading partial tiles"),
                  ("full_lo", "full_hi", False, "band, full tiles"),
                  ("full_hi", "hi", True, "band, trailing partial tiles")]
    for start, stop, masked, what in loops:
        out += [f"    for start_n in range({start}, {stop}, BLOCK_N):  # {what}"]
        if not masked:
            out.append("        start_n = tl.multiple_of(start_n, BLOCK_N)")
        out.append("        " + call.format(masked=masked))
    store_mask = _and("row_ok[:, None]", "offs_dv[None, :] < V_HEAD_DIM" if pad_dv else None)
    out += ["    # A row the masks empty has l = 0 and acc = 0: it gives zeros.",
            "    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]",
            "    o_ptrs = (Out + b64 * stride_ob + head[:, None] * stride_oh"
            " + q_idx[:, None] * stride_os\n              + offs_dv[None, :])",
            f"    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask={store_mask})", ""]
    return "\n".join(out)


def _ranges(spec: KernelSpec) -> list[str]:
    """Closed-form key bounds of this query tile (see the module docstring)."""
    out = ["    # Keys the tile can reach: [lo, hi); keys every row reads: [full_lo, full_hi).",
           "    first = pid_m * QB  # first and last query of the tile",
           "    last = tl.minimum(first + QB, Sq) - 1"]
    if spec.causal:
        out += ["    hi = tl.minimum(last + 1, Sk)  # is_causal: query i reads keys <= i",
                "    full_hi = tl.minimum(first + 1, Sk)"]
    else:
        out += ["    hi = Sk", "    full_hi = Sk"]
    if spec.neighborhood is not None:
        return out + _neighborhood_ranges(spec)
    if not spec.windowed:
        return out + ["    full_hi = full_hi // BLOCK_N * BLOCK_N"]
    if spec.sink:
        out.append(f"    sink_end = tl.cdiv(tl.minimum(hi, {spec.sink}), BLOCK_N) * BLOCK_N")
    w_max, w_min = ("w_max", "w_min") if spec.per_head else (spec.window, spec.window)
    out += ["    # window: |query pos - key pos| < W, query pos = i + offset",
            f"    lo = tl.maximum(first + offset - {w_max} + 1, 0) // BLOCK_N * BLOCK_N",
            f"    hi = tl.minimum(hi, tl.maximum(last + offset + {w_max}, 0))"]
    if spec.sink:
        out.append("    lo = tl.maximum(lo, sink_end)  # sink tiles are visited first")
    if spec.dilation > 1:
        return out
    out += [f"    full_lo = tl.maximum(last + offset - {w_min} + 1, 0)",
            f"    full_hi = tl.minimum(full_hi, tl.maximum(first + offset + {w_min}, 0))",
            "    # Tile-align: full tiles start at or after full_lo and end at or before full_hi.",
            "    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)",
            "    full_hi = tl.maximum(full_hi // BLOCK_N * BLOCK_N, full_lo)"]
    return out


def _neighborhood_keep(spec: KernelSpec) -> list[str]:
    """Lines of _attend_tile: ``keep &= near``, the neighbourhood predicate per element
    (rewriter.ir.masks.MaskSpec._neighborhood_keep, written out per axis)."""
    n, kernel, dil, half = spec.globals_, spec.neighborhood, spec.dilation, \
        spec.neighborhood // 2
    out = ["        pos = q_idx[:, None] + offset  # query position [BLOCK_M, 1]",
           f"        qc = tl.maximum(pos - {n}, 0)  # grid cells (globals: 0, overridden below)",
           f"        kc = tl.maximum(offs_n[None, :] - {n}, 0)"]
    stride, near = math.prod(spec.grid), []
    for axis, length in enumerate(spec.grid):
        stride //= length
        coord = {c: _axis_coord(c, stride, length, outermost=axis == 0) for c in ("qc", "kc")}
        out += [f"        x{axis} = {coord['qc']}  # axis {axis} (length {length})",
                f"        y{axis} = {coord['kc']}"]
        if dil == 1:
            out += [f"        s{axis} = tl.maximum(tl.minimum(x{axis} - {half}, "
                    f"{length - kernel}), 0)",
                    f"        near{axis} = (y{axis} >= s{axis}) & (y{axis} < s{axis} + {kernel})"]
        else:
            out += [f"        g{axis} = x{axis} % {dil}  # sub-grid (dilation)",
                    f"        s{axis} = tl.maximum(tl.minimum(x{axis} // {dil} - {half}, "
                    f"({length + dil - 1} - g{axis}) // {dil} - {kernel}), 0)",
                    f"        near{axis} = (y{axis} % {dil} == g{axis}) & "
                    f"(y{axis} // {dil} >= s{axis}) & (y{axis} // {dil} < s{axis} + {kernel})"]
        near.append(f"near{axis}")
    out.append(f"        near = {' & '.join(near)}")
    if n:
        out.append(f"        near |= (pos < {n}) | (offs_n[None, :] < {n})  # global tokens")
    return out + ["        keep &= near"]


def _axis_coord(cell: str, stride: int, length: int, *, outermost: bool) -> str:
    """A row-major coordinate of grid cell ``cell``: (cell // stride) % length."""
    expr = f"{cell} // {stride}" if stride > 1 else cell
    return expr if outermost else f"({expr}) % {length}"


def _neighborhood_ranges(spec: KernelSpec) -> list[str]:
    """Kernel lines: glob_end, and the band [lo, hi) of the tile (see `_band_lines`)."""
    n = spec.globals_
    out = ["    # Grid band: whole outermost rows the tile's neighbourhoods reach (_band_lines).",
           f"    first_g = tl.maximum(first + offset - {n}, 0)",
           f"    last_g = tl.maximum(last + offset - {n}, 0)"]
    out += ["    " + line.replace("MIN(", "tl.minimum(").replace("MAX(", "tl.maximum(")
            for line in _band_lines(spec)]
    out += ["    reach_hi = hi",
            "    lo = band_lo // BLOCK_N * BLOCK_N",
            "    hi = tl.minimum(hi, band_hi)"]
    if n:
        out += [f"    glob_end = tl.cdiv(tl.minimum(reach_hi, {n}), BLOCK_N) * BLOCK_N",
                f"    glob_q = first + offset < {n}  # a global query reads every key",
                "    lo = tl.maximum(tl.where(glob_q, 0, lo), glob_end)",
                "    hi = tl.where(glob_q, reach_hi, hi)"]
    return out


def _and(a: str, b: str | None) -> str:
    return a if b is None else f"{a} & ({b})"


def _load(ptrs: str, mask: str | None) -> str:
    return f"tl.load({ptrs})" if mask is None else f"tl.load({ptrs}, mask={mask}, other=0.0)"
