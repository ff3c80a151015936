"""Smoke test for the model zoo: every entry builds, runs eagerly, and exports.

It also checks that each entry's ``sites`` agree with the exported graph: one
sdpa or softmax node per site, in order, with matching head counts, and that HF
``-sdpa`` / ``-eager`` entries really got that attention implementation.
(ViT and the Whisper encoder fix their token count; their inputs ignore ``seq``.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

try:
    from zoo import NEGATIVES, ZOO, ZooEntry, get
except ImportError:  # tests/ imported as a package
    from tests.zoo import NEGATIVES, ZOO, ZooEntry, get

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
SHAPES = [(2, 7), (3, 9)]
HF_ARCHS = [
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt-neox",
    "opt",
    "bert",
    "vit",
    "t5",
    "whisper",
    "qwen3",
    "gemma3",
    "phi",
    "gptj",
    "codegen",
    "falcon",
    "falcon-mqa",
    "stablelm",
    "olmo2",
    "granite",
    "cohere",
    "mixtral",
    "gpt-bigcode",
    "bart",
    "distilbert",
    "albert",
    "clip-vision",
    "siglip-vision",
]

ALL = ZOO + NEGATIVES


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def test_registry():
    names = [e.name for e in ALL]
    assert len(names) == len(set(names))
    assert all(get(n).name == n for n in names)
    assert all(e.attention and e.sites for e in ZOO)
    assert all(not e.attention and not e.sites for e in NEGATIVES)
    for arch in HF_ARCHS:
        assert any(n.startswith(f"{arch}-") for n in names), arch
    with pytest.raises(KeyError):
        get("no-such-model")


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_zoo_entry(entry: ZooEntry):
    model = entry.build()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    with torch.no_grad():
        for batch, seq in SHAPES:
            args, kwargs = entry.inputs(batch, seq)
            outs = _tensors(model(*args, **kwargs))
            assert outs, "model returned no tensors"
            assert outs[0].shape[0] == batch
            assert all(torch.isfinite(t).all() for t in outs if t.is_floating_point())

    args, kwargs = entry.inputs(*SHAPES[0])
    with torch.no_grad():
        expected = _tensors(model(*args, **kwargs))
    ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    with torch.no_grad():
        got = _tensors(ep.module()(*args, **kwargs))
    assert len(got) == len(expected)
    for g, x in zip(got, expected, strict=True):
        torch.testing.assert_close(g, x)

    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    sdpa = [n for n in calls if n.target == SDPA]
    softmax = [n for n in calls if n.target in SOFTMAX]

    if not entry.attention:
        assert not sdpa
        return

    # MoE routers: a softmax over [tokens, experts] logits, not attention.
    routers = [n for n in softmax if len(_shape(n.args[0])) == 2]
    assert len(routers) == entry.other_softmax
    softmax = [n for n in softmax if n not in routers]
    calls = [n for n in calls if n not in routers]

    if entry.name.endswith("-sdpa"):
        assert not softmax, "sdpa entry fell back to eager attention"
        assert len(sdpa) == len(entry.sites)
    elif entry.name.endswith("-eager"):
        assert not sdpa, "eager entry still calls sdpa"
        assert len(softmax) == len(entry.sites)

    # One attention node (sdpa or softmax) per site, in graph order.
    attn = [n for n in calls if n.target == SDPA or n.target in SOFTMAX]
    assert len(attn) == len(entry.sites)
    batch = SHAPES[0][0]
    for node, (heads, kv_heads, head_dim) in zip(attn, entry.sites, strict=True):
        if node.target == SDPA:
            q, k = _shape(node.args[0]), _shape(node.args[1])
            assert q[1] == heads and q[-1] == head_dim
            assert k[1] in (kv_heads, heads)  # HF repeats kv before sdpa when a mask is given
        else:
            s = _shape(node.args[0])
            if len(s) == 4:
                assert s[:2] == (batch, heads)
            else:  # [B*H, Sq, Sk]
                assert len(s) == 3 and s[0] == batch * heads
