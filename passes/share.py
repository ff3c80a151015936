"""Cross-layer sharing of attention matrices.

    share-kv:group=G[,layers=auto]    in each run of G consecutive self-attention layers the
        later layers read the first layer's K and V; their k/v projections go away and they
        add nothing to the KV cache (cross-layer attention, Brandon et al. 2024).
    share-attn:group=G[,layers=auto]  the later layers reuse the first layer's attention
        probabilities (softmax(q_i k_i^T)); their q/k projections go away.

With layers=auto the runs are chosen from calibration data: the segmentation of the layers
into the same number of runs that keeps shared tensors (K/V, resp. attention maps) most
similar to the ones they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.errors import SpecError
from rewriter.ir.graph import canonical_nodes
from rewriter.ir.ops import reference_probs
from rewriter.ir.specs import Key, Spec, choice, positive_int
from rewriter.passes.base import PassContext, PassResult
from rewriter.passes.observe import calibrate, default_output
from rewriter.passes.parallel import all_sum
from rewriter.passes.registry import variant

KEYS = {
    "group": Key(positive_int, "a positive integer (layers per run)", required=True,
                 metavar="G"),
    "layers": Key(choice("fixed", "auto"), "fixed or auto", default="fixed", metavar="auto"),
}


def fixed_runs(n: int, group: int) -> list[list[int]]:
    return [list(range(i, min(i + group, n))) for i in range(0, n, group)]


def best_runs(cost: torch.Tensor, num_runs: int) -> list[list[int]]:
    """Split 0..n-1 into ``num_runs`` consecutive runs minimizing the summed cost[first, j] of
    every later member j of a run (dynamic programming, O(n^2 * runs))."""
    n = cost.shape[0]
    inf = float("inf")
    # run_cost[a][b]: run a..b (inclusive) led by a
    run_cost = [[0.0] * n for _ in range(n)]
    for a in range(n):
        acc = 0.0
        for b in range(a, n):
            acc += float(cost[a, b]) if b > a else 0.0
            run_cost[a][b] = acc
    best = [[inf] * (num_runs + 1) for _ in range(n + 1)]
    back = [[-1] * (num_runs + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for end in range(1, n + 1):
        for r in range(1, num_runs + 1):
            for start in range(r - 1, end):
                c = best[start][r - 1] + run_cost[start][end - 1]
                if c < best[end][r]:
                    best[end][r], back[end][r] = c, start
    runs, end, r = [], n, num_runs
    while r > 0:
        start = back[end][r]
        runs.append(list(range(start, end)))
        end, r = start, r - 1
    return runs[::-1]


# decorators apply bottom-up: share-kv registers (and lists) first
@variant("share-attn", KEYS, "later layers of each run reuse the first layer's attention "
         "probabilities; their q/k projections go away")
@variant("share-kv", KEYS, "later layers of each run reuse the first layer's K/V; their k/v "
         "projections go away and they add nothing to the KV cache")
class SharePass:
    """share-kv (what="kv") and share-attn (what="attn")."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.what = "kv" if spec.name == "share-kv" else "attn"
        self.name = spec.name

    def run(self, program, ctx: PassContext) -> PassResult:
        program = program.clone()
        sites = [s for s in program.sites if not s.cross and s.kv_source is None
                 and s.attn_source is None]
        if len(sites) < 2:
            raise SpecError(f"spec {self.spec}: needs at least two self-attention sites")
        group = self.spec.params["group"]
        if self.spec.params["layers"] == "auto":
            cost = self._dissimilarity(program, sites, ctx)
            runs = best_runs(cost, -(-len(sites) // group))
        else:
            runs = fixed_runs(len(sites), group)
        nodes = canonical_nodes(program.module)
        shared = []
        for run in runs:
            first = sites[run[0]]
            lead = nodes[first.node]
            for j in run[1:]:
                site = sites[j]
                node = nodes[site.node]
                self._check_compatible(first, site)
                if self.what == "kv":
                    node.args = (node.args[0], lead.args[1], lead.args[2], *node.args[3:])
                    site.kv_source, site.k_proj, site.v_proj = first.index, None, None
                else:
                    # softmax(q_i k_i^T + mask_i) of the first layer, applied to this layer's v.
                    node.args = (lead.args[0], lead.args[1], node.args[2], *lead.args[3:])
                    node.kwargs = {**lead.kwargs}
                    site.attn_source, site.q_proj, site.k_proj = first.index, None, None
                    site.num_heads, site.scale = first.num_heads, first.scale
                shared.append(site.index)
        program.module.recompile()
        counts = {"runs": [[sites[i].index for i in run] for run in runs], "shared": shared}
        return PassResult(program, bool(shared), counts)

    def _check_compatible(self, first, site) -> None:
        same = (first.num_kv_heads, first.head_dim) == (site.num_kv_heads, site.head_dim)
        if self.what == "attn":
            same = same and first.num_heads == site.num_heads
        if not same:
            raise SpecError(f"spec {self.spec}: site {site.index} ({site.num_heads}/"
                            f"{site.num_kv_heads} heads, D={site.head_dim}) cannot share with "
                            f"site {first.index} ({first.num_heads}/{first.num_kv_heads}, "
                            f"D={first.head_dim})")

    def _dissimilarity(self, program, sites, ctx: PassContext) -> torch.Tensor:
        """cost[i, j] = 1 - mean cosine similarity of site j's K/V (or attention map) to site
        i's, over calibration batches."""
        order = {s.index: i for i, s in enumerate(sites)}
        feats: dict[int, list[torch.Tensor]] = {}

        def observer(site, q, k, v, attn_mask, attrs):
            if site in order:
                if self.what == "kv":
                    f = torch.cat([k.float().flatten(2), v.float().flatten(2)], -1)
                else:
                    f = reference_probs(q, k, attn_mask, scale=attrs["scale"],
                                        is_causal=attrs["is_causal"],
                                        sparsity=attrs["sparsity"],
                                        softcap=attrs["softcap"]).flatten(2)
                feats.setdefault(order[site], []).append(f.flatten(0, 1))  # [B*H, features]
            return default_output(q, k, v, attn_mask, attrs)

        calibrate(program, ctx, observer, f"{self.name} layers=auto: similarity",
                  data_parallel=True)
        # summed over rows (and, under torchrun, processes): the mean is taken after all_sum
        n = len(sites)
        stacked = [torch.cat(feats[i]) if i in feats else None for i in range(n)]
        sums = {"cosine": torch.zeros(n, n, dtype=torch.float64),
                "rows": torch.zeros(n, n, dtype=torch.float64),
                "incompatible": torch.zeros(n, n, dtype=torch.float64)}
        for i in range(n):
            for j in range(i + 1, n):
                if stacked[i] is None or stacked[j] is None:  # no batches on this process
                    continue
                if stacked[i].shape != stacked[j].shape:
                    sums["incompatible"][i, j] = 1.0
                    continue
                cos = F.cosine_similarity(stacked[i], stacked[j], dim=-1)
                sums["cosine"][i, j] = cos.double().sum()
                sums["rows"][i, j] = cos.numel()
        all_sum(sums)
        mean = sums["cosine"] / sums["rows"].clamp_min(1)
        cost = torch.where(sums["incompatible"] > 0, 2.0, 1.0 - mean).float()
        return cost.triu(1)
