"""``gqa:kv-heads=N[,grouping=contiguous|similarity][,merge=mean|fit]``: convert every site to N
KV heads. K/V projections physically shrink; query heads stay.

merge=mean  mean-pools the K and V projection rows of each group (Ainslie et al. 2023).
merge=fit   (default) training-free and calibrated; alignment maps are folded into the
            neighbouring weights so merging loses as little as possible:
  values    shared basis = the top-Dv principal directions of the group's value activations;
            each original head's map from it (its block of the basis) folds into the o_proj
            columns of the query heads that read it.
  keys      under RoPE, per frequency pair a complex scalar per head (a 2x2 rotation-scaling,
            which commutes with RoPE) folds into the query projection; the shared key of each
            pair is the top singular direction of the group's keys weighted by the queries
            that read them (post-RoPE statistics equal pre-RoPE ones: the rotation is common
            to all heads at a position). Without RoPE, a PCA basis as for values.
  Per site, fit is kept only if it reconstructs the attention output on calibration data
  better than mean (so fit never loses to mean there).
  Calibrated merges run layer by layer (rewriter.passes.sequential): a site's statistics come
  from the inputs the already merged layers produce, so each fit also absorbs upstream error.
grouping=similarity groups KV heads whose keys/values are most alike (query heads follow).

Shape glossary: H query heads, Hkv KV heads, N new KV heads, g = H / Hkv, D head dim,
E model width, T calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter.analysis.quality import calibration_loss
from rewriter.errors import SpecError
from rewriter.ir.graph import cleanup
from rewriter.ir.ops import reference_attention
from rewriter.ir.specs import Key, Spec, choice, positive_int
from rewriter.passes.base import PassContext, PassResult
from rewriter.passes.heads import (
    HeadWeights,
    OutWeights,
    node_of,
    rebuild_site,
    site_heads,
)
from rewriter.passes.observe import default_output
from rewriter.passes.parallel import all_sum, gather, shard
from rewriter.passes.registry import variant
from rewriter.passes.sequential import Sequential, release_memory
from rewriter.passes.surgery import nodes_between, trace_input

KEYS = {
    "kv-heads": Key(positive_int, "a positive integer dividing every site's query heads",
                    required=True, metavar="N"),
    "grouping": Key(choice("contiguous", "similarity"), "contiguous or similarity",
                    default="contiguous", metavar="contiguous|similarity"),
    "merge": Key(choice("mean", "fit"), "mean or fit", default="fit", metavar="mean|fit"),
}

MAX_CALIBRATION_TOKENS = 2048  # per site, for the fit statistics and the fit-vs-mean check


def _calibration_loss(program, reference, batches) -> float:
    """`calibration_loss` over all batches; under torchrun each process runs its share."""
    mine = shard(batches)
    sums = {"loss": calibration_loss(program, reference, mine) * len(mine), "count": len(mine)}
    all_sum(sums)
    return sums["loss"] / max(sums["count"], 1)


def _divisors(n: int) -> set[int]:
    return {d for d in range(1, n + 1) if n % d == 0}


@variant("gqa", KEYS, "N KV heads per site; K/V projections shrink. `fit` (default) folds "
         "calibrated alignment maps into q and o (RoPE-commuting per-pair complex scalings for "
         "keys, a PCA basis for values) and is kept only where it beats `mean` on the "
         "calibration data")
class GqaPass:
    name = "gqa"

    def __init__(self, spec: Spec):
        self.spec = spec

    def run(self, program, ctx: PassContext) -> PassResult:
        source = program
        n = self.spec.params["kv-heads"]
        valid = set.intersection(*(_divisors(s.num_heads) & _divisors(s.num_kv_heads)
                                   for s in program.sites))
        if n not in valid:
            raise SpecError(f"spec {self.spec}: kv-heads={n} must divide every site's query "
                            f"and KV heads (valid: {', '.join(map(str, sorted(valid)))})")
        todo = {s.index for s in program.sites if s.num_kv_heads != n}
        fit = self.spec.params["merge"] == "fit"
        calibrated = fit or self.spec.params["grouping"] == "similarity"
        before = sum(s.kv_cache_bytes_per_token() for s in program.sites)
        if calibrated:
            program, chosen, groups = self._sequential(source, todo, ctx, fit)
        else:
            program, groups = self._convert(source, todo, {}), {}
            chosen = {i: "mean" for i in sorted(todo)}
        counts: dict = {"kv_heads": n}
        if "fit" in chosen.values():
            # Keep the fitted merge only if it also wins end to end on the calibration data.
            mean = self._convert(source, todo, groups)
            batches = ctx.batches(source)
            loss_fit = _calibration_loss(program, source, batches)
            loss_mean = _calibration_loss(mean, source, batches)
            counts["calibration_loss"] = {"fit": loss_fit, "mean": loss_mean}
            if loss_mean < loss_fit:
                program, chosen = mean, {i: "mean" for i in chosen}
        after = sum(s.kv_cache_bytes_per_token() for s in program.sites)
        counts.update(merge=chosen, kv_cache_bytes_per_token=[before, after])
        return PassResult(program, bool(todo), counts)

    def _convert(self, source, todo: set[int], groups: dict[int, list[list[int]]]):
        """``source`` with every site in ``todo`` mean-merged (KV head groups from ``groups``
        where given)."""
        program = source.clone()
        for site in program.sites:
            if site.index in todo:
                self._convert_site(program, site, None, fit=False,
                                   groups=groups.get(site.index))
        # the old projections read parameters that now have new shapes: drop them before running
        cleanup(program.module)
        return program

    def _sequential(self, source, todo: set[int], ctx: PassContext, fit: bool):
        """Merge layer by layer (rewriter.passes.sequential): the statistics of a site are
        collected on the inputs that the already merged layers before it produce, so each fit
        also absorbs the error upstream. Returns (program, merge chosen per site, statistics).
        Under torchrun each process runs its share of the batches and the statistics are
        gathered (rewriter.passes.parallel), so every process fits the same maps."""
        program = source.clone()
        batches = ctx.batches(source)
        seq = Sequential(program.module, program.sites)
        mine = shard(range(len(batches)))
        envs = [seq.start(*batches[b]) for b in mine]
        acts: dict[int, dict] = {}
        chosen: dict[int, str] = {}
        groups: dict[int, list[list[int]]] = {}
        by_index = {s.index: s for s in program.sites}
        layers = sorted({seq.segment_of_site[i] for i in todo})
        with torch.no_grad():
            for i in range(len(seq)):
                here = sorted(s for s in todo if seq.segment_of_site[s] == i)
                if here:
                    running = [0]  # the batch being run, for the observer's records
                    observer = self._observer(set(here), acts, running)
                    for b, env in zip(mine, envs, strict=True):
                        running[0] = b
                        seq.run(env, i, observe=observer)
                    for index in here:
                        stats = _gathered(acts.pop(index, {"batches": []}))
                        chosen[index], groups[index] = self._convert_site(
                            program, by_index[index], stats, fit)
                    cleanup(program.module)
                    seq = Sequential(program.module, program.sites)
                    ctx.report(f"{self.spec}: layer by layer", layers.index(i) + 1, len(layers))
                envs = [seq.run(env, i)[0] for env in envs]
                release_memory()
        return program, chosen, groups

    def _convert_site(self, program, site, acts, fit: bool,
                      groups: list[list[int]] | None = None) -> tuple[str, list[list[int]]]:
        """Merge one site's KV heads in place; returns "fit" or "mean", whichever
        reconstructs its attention output better on ``acts`` (mean without statistics), and
        the KV head groups (``groups``, or chosen from ``acts``)."""
        n = self.spec.params["kv-heads"]
        heads = site_heads(program.module, site)
        groups = groups or self._groups(site, n, acts)
        order = [h for grp in groups for h in grp]  # KV heads, group by group
        g = site.kv_group
        q_order = [h * g + i for h in order for i in range(g)]
        d, dv = heads["k"].weight.shape[1], heads["v"].weight.shape[1]
        plans = [mean_plan(len(order) // n, d, dv) for _ in range(n)]
        chosen = "mean"
        if fit and acts:
            a = acts["batches"]
            k_act, v_act, q_act = _flat(a, "k"), _flat(a, "v"), _flat(a, "q")
            keys = key_fit_kind(program, site)
            fitted = [fit_plan(k_act[grp], v_act[grp],
                               q_act.view(site.num_kv_heads, g, *q_act.shape[1:])[grp], keys)
                      for grp in (torch.tensor(gr) for gr in groups)]
            if reconstruction_error(acts, order, fitted, g) <= \
                    reconstruction_error(acts, order, plans, g):
                plans, chosen = fitted, "fit"
        merged = apply_plans(heads["q"].select(q_order), heads["k"].select(order),
                             heads["v"].select(order), heads["o"].select(q_order), plans, g)
        if chosen == "mean" and q_order == sorted(q_order):
            # a mean merge in head order leaves q and o as they are: keep sharing them
            merged = {role: merged[role] for role in ("k", "v")}
        rebuild_site(program, site, merged, query_heads=q_order)
        return chosen, groups

    # --- calibration statistics -------------------------------------------------------

    def _observer(self, wanted: set[int], stats: dict, running: list[int]):
        """An observer recording, per site in ``wanted``: q [B, H, S, D], k, v [B, Hkv, S, D]
        (post-positional, as the core sees them), the mask, the attributes and the per-head
        attention output, over up to MAX_CALIBRATION_TOKENS query tokens; each record names
        its batch (``running[0]``)."""

        def observer(site, q, k, v, attn_mask, attrs):
            out = default_output(q, k, v, attn_mask, attrs)
            if site in wanted:
                entry = stats.setdefault(site, {"batches": []})
                if _tokens(entry["batches"]) < MAX_CALIBRATION_TOKENS:
                    entry["batches"].append({"q": q.float(), "k": k.float(), "v": v.float(),
                                             "mask": attn_mask, "attrs": attrs,
                                             "out": out.float(), "batch": running[0]})
            return out

        return observer

    def _groups(self, site, n: int, acts) -> list[list[int]]:
        size = site.num_kv_heads // n
        if self.spec.params["grouping"] == "contiguous" or size == 1:
            return [list(range(j * size, (j + 1) * size)) for j in range(n)]
        return similarity_groups(acts, site.num_kv_heads, size)


def _tokens(records: list[dict]) -> int:
    return sum(r["q"].shape[0] * r["q"].shape[2] for r in records)


def _gathered(stats: dict) -> dict:
    """A site's records from every process, in batch order, cut where one process running
    every batch would have stopped recording. Each process stops only after it holds every
    one of its batches that the single process records, so nothing the cut keeps is
    missing."""
    kept: list[dict] = []
    for record in sorted(gather(stats["batches"]), key=lambda r: r["batch"]):
        if _tokens(kept) >= MAX_CALIBRATION_TOKENS:
            break
        kept.append(record)
    return {"batches": kept} if kept else {}


def key_fit_kind(program, site) -> str:
    """Which key alignment commutes with the site's positional transform."""
    if site.positional == "none":
        return "pca"
    if site.positional != "rope" or site.head_dim % 2:
        return "mean"  # partial or unknown transforms: keep keys mean-pooled
    chain = trace_input(node_of(program, site).args[1])
    ops = {n.target for out, inp in chain.units for n in nodes_between(inp, out)}
    return "interleaved" if torch.ops.aten.stack.default in ops else "half"


@dataclass
class GroupPlan:
    """How one new KV head is made from ``size`` old ones (as linear maps on activations, which
    are the same maps on projection rows):

        k_j = k_mix @ [k_h1; k_h2; ...]      k_h ~ k_maps[m] @ k_j   (folded into q rows)
        v_j = v_mix @ [v_h1; v_h2; ...]      v_h ~ v_maps[m] @ v_j   (folded into o columns)
    """

    k_mix: torch.Tensor  # [D, size*D]
    v_mix: torch.Tensor  # [Dv, size*Dv]
    k_maps: list[torch.Tensor]  # [D, D] per member
    v_maps: list[torch.Tensor]  # [Dv, Dv] per member


def mean_plan(size: int, d: int, dv: int) -> GroupPlan:
    eye_k, eye_v = torch.eye(d, dtype=torch.float64), torch.eye(dv, dtype=torch.float64)
    return GroupPlan(torch.cat([eye_k] * size, 1) / size, torch.cat([eye_v] * size, 1) / size,
                     [eye_k] * size, [eye_v] * size)


def fit_plan(k_act: torch.Tensor, v_act: torch.Tensor, q_act: torch.Tensor,
             keys: str) -> GroupPlan:
    """k_act [size, T, D], v_act [size, T, Dv] of one group's KV heads; q_act [size, g, T, D]
    the queries reading each of them. ``keys``: "half" / "interleaved" (RoPE pairing), "pca"
    (no positional transform) or "mean" (a transform we cannot commute with)."""
    size, _, d = k_act.shape
    v_mix, v_maps = _pca(v_act)
    if keys in ("half", "interleaved"):
        k_mix, k_maps = _rope_pairs(k_act, q_act, interleaved=keys == "interleaved")
    elif keys == "pca":
        k_mix, k_maps = _pca(k_act)
    else:
        plan = mean_plan(size, d, v_act.shape[-1])
        k_mix, k_maps = plan.k_mix, plan.k_maps
    return GroupPlan(k_mix, v_mix, k_maps, v_maps)


def _pca(act: torch.Tensor):
    """Shared basis U [size*D, D] of the group's activations; mix = U^T, maps[m] = U_m."""
    size, _, d = act.shape
    stacked = act.double().permute(0, 2, 1).reshape(size * d, -1)  # [size*D, T]
    _, evecs = torch.linalg.eigh(stacked @ stacked.T)
    u = evecs[:, -d:].flip(-1)
    return u.T, [u[m * d:(m + 1) * d] for m in range(size)]


def _rope_pairs(k_act: torch.Tensor, q_act: torch.Tensor, interleaved: bool = False):
    """RoPE pairs as complex numbers: (p, p + D/2) for rotate-half, (2p, 2p + 1) for
    rotate-every-two. Per pair: minimize
    sum_h w_h^2 |k_h - c_h k_j|^2, w_h^2 the energy of the queries reading head h on that pair:
    k_j = sum_h conj(u_h) w_h k_h and c_h = u_h / w_h, u the top eigenvector of the weighted
    Gram matrix. A complex scalar is a 2x2 rotation-scaling, so it commutes with RoPE."""
    size, _, d = k_act.shape
    half = d // 2
    re = torch.arange(0, d, 2) if interleaved else torch.arange(half)
    im = re + 1 if interleaved else re + half
    kc = torch.complex(k_act[..., re].double(), k_act[..., im].double())  # [size, T, D/2]
    qc = torch.complex(q_act[..., re].double(), q_act[..., im].double())
    weight = (qc.abs() ** 2).mean(dim=(1, 2)).sqrt().clamp_min(1e-12)  # [size, D/2]
    mix = torch.zeros(d, size * d, dtype=torch.float64)
    maps = [torch.zeros(d, d, dtype=torch.float64) for _ in range(size)]
    for p in range(half):
        weighted = weight[:, p, None] * kc[:, :, p]  # [size, T]
        _, evecs = torch.linalg.eigh(weighted @ weighted.conj().T)
        u = evecs[:, -1]
        a = u.conj() * weight[:, p]  # k_j = sum_h a_h k_h
        c = u / weight[:, p]  # k_h ~ c_h k_j
        r, i = int(re[p]), int(im[p])
        for m in range(size):
            _put_complex(mix, (r, i), (m * d + r, m * d + i), a[m])
            _put_complex(maps[m], (r, i), (r, i), c[m])
    return mix, maps


def _put_complex(mat: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                 z: torch.Tensor) -> None:
    """Write multiplication by z (on the pair ``cols`` as x + iy) into ``rows``:
    (x + iy) z = (zr x - zi y) + i (zi x + zr y)."""
    (r0, r1), (c0, c1) = rows, cols
    mat[r0, c0], mat[r0, c1] = z.real, -z.imag
    mat[r1, c0], mat[r1, c1] = z.imag, z.real


def apply_plans(q: HeadWeights, k: HeadWeights, v: HeadWeights, o: OutWeights,
                plans: list[GroupPlan], g: int) -> dict:
    """New weights: merged K/V rows, query rows and o columns with the maps folded in. All
    inputs are in the new head order (groups contiguous)."""
    size = k.weight.shape[0] // len(plans)
    dtype = k.weight.dtype

    def mixed(hw: HeadWeights, mixes) -> HeadWeights:
        rows = hw.weight.double().reshape(len(plans), -1, hw.weight.shape[-1])
        w = torch.stack([m @ r for m, r in zip(mixes, rows, strict=True)])
        b = None
        if hw.bias is not None:
            bias = hw.bias.double().reshape(len(plans), -1)
            b = torch.stack([m @ r for m, r in zip(mixes, bias, strict=True)]).to(dtype)
        return HeadWeights(w.to(dtype), b)

    new_q, new_qb = q.weight.double().clone(), None if q.bias is None else q.bias.double().clone()
    new_o = o.weight.double().clone()
    for j, plan in enumerate(plans):
        for m in range(size):
            for i in range(g):
                row = (j * size + m) * g + i
                # q . (M k_j) = (M^T q) . k_j ;  W_o (M v_j) = (W_o M) v_j
                new_q[row] = plan.k_maps[m].T @ new_q[row]
                if new_qb is not None:
                    new_qb[row] = plan.k_maps[m].T @ new_qb[row]
                new_o[:, row] = new_o[:, row] @ plan.v_maps[m]
    return {
        "q": HeadWeights(new_q.to(dtype), None if new_qb is None else new_qb.to(dtype)),
        "k": mixed(k, [p.k_mix for p in plans]),
        "v": mixed(v, [p.v_mix for p in plans]),
        "o": OutWeights(new_o.to(dtype), o.bias),
    }


def _flat(batches, key: str) -> torch.Tensor:
    """[heads, T, D] over all calibration batches."""
    return torch.cat([b[key].permute(1, 0, 2, 3).flatten(1, 2) for b in batches], dim=1)


def similarity_groups(acts, kv_heads: int, size: int) -> list[list[int]]:
    """Greedy equal-size clustering of KV heads by cosine similarity of their K and V."""
    k, v = _flat(acts["batches"], "k"), _flat(acts["batches"], "v")
    feats = torch.nn.functional.normalize(torch.cat([k.flatten(1), v.flatten(1)], 1), dim=1)
    sim = feats @ feats.T
    left, groups = list(range(kv_heads)), []
    while left:
        seed = left[0]
        ranked = sorted(left[1:], key=lambda h: -float(sim[seed, h]))
        grp = [seed, *ranked[: size - 1]]
        groups.append(sorted(grp))
        left = [h for h in left if h not in grp]
    return groups


def reconstruction_error(acts, order: list[int], plans: list[GroupPlan], g: int) -> float:
    """Squared error, over the calibration batches, of every query head's attention output
    (in the o_proj input space of the original head) after merging with ``plans``."""
    size = len(order) // len(plans)
    q_order = torch.tensor([h * g + i for h in order for i in range(g)])
    err = 0.0
    for b in acts["batches"]:
        q = b["q"][:, q_order].double()
        k, v = b["k"][:, order].double(), b["v"][:, order].double()
        out = b["out"][:, q_order].double()
        ks, vs, qs, maps_v = [], [], [], []
        for j, plan in enumerate(plans):
            grp = slice(j * size, (j + 1) * size)
            ks.append(torch.einsum("de,bse->bsd", plan.k_mix,
                                   k[:, grp].permute(0, 2, 1, 3).flatten(2)))
            vs.append(torch.einsum("de,bse->bsd", plan.v_mix,
                                   v[:, grp].permute(0, 2, 1, 3).flatten(2)))
            for m in range(size):
                for i in range(g):
                    row = (j * size + m) * g + i
                    qs.append(q[:, row] @ plan.k_maps[m])  # (M^T q)^T = q^T M
                    maps_v.append(plan.v_maps[m])
        kn, vn, qn = torch.stack(ks, 1), torch.stack(vs, 1), torch.stack(qs, 1)
        attrs = b["attrs"]
        mask = b["mask"].double() if b["mask"] is not None and b["mask"].is_floating_point() \
            else b["mask"]
        got = reference_attention(qn, kn, vn, mask, **attrs)  # [B, H, S, Dv]
        got = torch.stack([got[:, r] @ maps_v[r].T for r in range(got.shape[1])], 1)
        err += float(((got - out) ** 2).sum())
    return err
