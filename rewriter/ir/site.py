"""`AttentionSite`: one attention in a captured graph, described by reference (no tensors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Projection:
    """A linear map feeding q, k or v (or fed by the merged heads, for the output projection).

    ``features[h]`` lists, for head h, the projection's output features (for o_proj: input
    features) that hold that head's D channels, in channel order. A fused QKV projection shows
    up as three Projections with the same ``weight`` and disjoint features."""

    node: str
    weight: str  # qualified parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    bias: str | None
    kind: str  # "linear" (W is [out, in]) or "conv1d" (W is [in, out], GPT-2) or "matmul"
    features: tuple[tuple[int, ...], ...] = field(repr=False)
    total: int = 0  # the weight's output features (input features for o_proj)

    def __repr__(self) -> str:
        return f"Projection({self.describe()}, {self.kind}, heads={len(self.features)})"

    @property
    def fused(self) -> bool:
        """The weight also feeds something else (e.g. the k and v of a fused QKV)."""
        return self.out_features_used < self.total

    @property
    def out_features_used(self) -> int:
        return len({f for head in self.features for f in head})

    @property
    def first_feature(self) -> int:
        return min((f for head in self.features for f in head), default=0)

    def describe(self) -> str:
        flat = [f for head in self.features for f in head]
        contiguous = flat == list(range(flat[0], flat[0] + len(flat))) if flat else True
        where = f"[{flat[0]}:{flat[0] + len(flat)}]" if contiguous else "[interleaved]"
        return f"{self.weight}{where}"


@dataclass
class AttentionSite:
    """One attention in the graph. Patterns create sites; passes read them."""

    index: int
    pattern: str  # how the model wrote it: "sdpa", "matmul-softmax", "bmm-softmax", ...
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    is_causal: bool
    mask: str  # "none", "causal", "causal-mask", "padding-mask", "bias", "relative-bias", ...
    softcap: float = 0.0
    dropout: float = 0.0
    kv_expansion: str = "none"  # how K/V heads were repeated for GQA ("repeat_kv", ...)
    positional: str = "none"  # transform on q and k between projection and core ("rope", ...)
    cross: bool = False  # keys/values come from another sequence than the queries
    module_path: str = ""
    layer: int | None = None
    q_proj: Projection | None = None
    k_proj: Projection | None = None
    v_proj: Projection | None = None
    o_proj: Projection | None = None
    sparsity: str = ""  # MaskSpec string on the canonical node ("" = dense)
    # the model's own sliding window, found at capture (patterns.native_window): part of
    # ``sparsity``; a sparse variant ANDs its mask with it
    model_window: int | None = None
    alibi: tuple[float, ...] = ()  # ALiBi slopes per query head (the node's alibi attribute)
    kv_source: int | None = None  # share-kv: the site whose K/V this one reads
    attn_source: int | None = None  # share-attn: the site whose probabilities this one reuses
    node: str = ""  # the canonical rewriter.attention node
    backend: str = "eager"
    notes: list[str] = field(default_factory=list)

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V cache bytes per token for this site (not for cross attention to a fixed
        encoder output, which is cached once)."""
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * bytes_per_element

    def to_dict(self, full: bool = False) -> dict:
        """JSON-ready. ``full`` keeps every projection feature index (what `from_dict` needs);
        otherwise a one-line description of each projection."""
        d = asdict(self)
        for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(self, key)
            d[key] = None if proj is None else {
                "node": proj.node, "weight": proj.weight, "bias": proj.bias, "kind": proj.kind,
                "features": [list(f) for f in proj.features] if full else proj.describe(),
                "total": proj.total,
            }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AttentionSite:
        d = dict(d)
        for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = d.get(key)
            d[key] = None if p is None else Projection(
                p["node"], p["weight"], p["bias"], p["kind"],
                tuple(tuple(f) for f in p["features"]), p.get("total", 0))
        d["alibi"] = tuple(d.get("alibi") or ())
        return cls(**d)
