"""Variants that change what attention computes: sparse masks, share-kv, share-attn.

Exactness: a window covering the sequence changes nothing; sharing between layers whose
inputs and shared weights are identical changes nothing; masks that empty a row give zeros."""

from __future__ import annotations

import pytest
import torch
import zoo

import rewriter as rw
from rewriter.ir.masks import MaskSpec
from rewriter.ir.ops import reference_attention

TOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    entry = zoo.get("llama-eager")
    model = entry.build()
    args, kwargs = entry.inputs(2, 7)
    return entry, model, rw.capture(model, args, kwargs)


def calibration(batches: int = 2, seq: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 100, (1, seq), generator=g) for _ in range(batches)]


def other_shapes(entry):
    return [entry.inputs(3, 9), entry.inputs(1, 16)]


def test_window_covering_the_sequence_is_exact(llama):
    entry, model, prog = llama
    wide = rw.rewrite(prog, "sparse:window=64,sink=4")
    assert [s.sparsity for s in wide.sites] == ["window=64,sink=4"] * 2
    for args, kwargs in [entry.inputs(2, 7), *other_shapes(entry)]:
        assert wide.verify(model, args, kwargs).max_rel <= TOL


def test_narrow_window_changes_output_and_input_is_untouched(llama):
    entry, model, prog = llama
    narrow = rw.rewrite(prog, "sparse:window=2")
    assert narrow.verify(prog).max_rel > 1e-3
    assert all(s.sparsity == "" for s in prog.sites)  # the input program is not mutated
    assert prog.verify(model).max_rel <= TOL
    for args, kwargs in other_shapes(entry):  # runs at other lengths
        out = narrow(*args, **kwargs).logits
        assert torch.isfinite(out).all()


def test_narrow_window_equals_reference_math():
    """The canonical op with sparsity equals the naive reference (dense mask)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for spec in ["window=3", "window=3,sink=2", "window=5,dilation=2", "window=2,heads=fssf"]:
        got = torch.ops.rewriter.attention(q, k, v, None, scale=0.3, is_causal=True,
                                           sparsity=spec)
        want = reference_attention(q, k, v, None, scale=0.3, is_causal=True, sparsity=spec)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rows_emptied_by_the_mask_give_zeros_not_nan():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 8, generator=g)
    k, v = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    # top-left causal lets query 0 see key 0 only; a window of 2 at position 6 excludes it.
    out = torch.ops.rewriter.attention(q, k, v, None, scale=0.3, is_causal=True,
                                       sparsity="window=2")
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    ref = reference_attention(q, k, v, None, scale=0.3, is_causal=True, sparsity="window=2")
    assert not torch.isnan(ref).any()


def test_layers_and_heads_subsets(llama):
    _, _, prog = llama
    new = rw.rewrite(prog, "sparse:window=2,layers=1,heads=0;2")
    assert new.sites[0].sparsity == ""
    assert MaskSpec.parse(new.sites[1].sparsity) == MaskSpec(window=2, heads="sfsf")


def test_sparse_heads_auto_reaches_requested_density(llama):
    _, _, prog = llama
    new = rw.rewrite(prog, "sparse:heads=auto,density=0.6,window=4,sink=1,ctx=24",
                     calibration=calibration())
    info = new.manifest["passes"][-1]
    # a budget: at most the requested density, and within one KV head's share (1 of 4) of it
    assert 0.6 - 0.25 <= info["density_at_ctx"] <= 0.6 + 1e-9
    # per KV head decisions: query heads of one group share a letter
    for site in new.sites:
        windows = MaskSpec.parse(site.sparsity).head_windows(site.num_heads).tolist() \
            if site.sparsity else [0] * site.num_heads
        groups = [windows[g * site.kv_group:(g + 1) * site.kv_group]
                  for g in range(site.num_kv_heads)]
        assert all(len(set(grp)) == 1 for grp in groups)


def test_sparse_heads_auto_picks_per_head_windows_within_budget(llama):
    _, _, prog = llama
    new = rw.rewrite(prog, "sparse:heads=auto,density=0.5,sink=1,ctx=256",
                     calibration=calibration(seq=256))
    assert new.manifest["passes"][-1]["density_at_ctx"] <= 0.5 + 1e-9
    assert new.accounting(256)["attention_density"] <= 0.5 + 1e-9


def test_sparse_heads_auto_density_one_is_dense_and_exact(llama):
    _, model, prog = llama
    new = rw.rewrite(prog, "sparse:heads=auto,density=1.0,window=4,ctx=24",
                     calibration=calibration())
    assert all(s.sparsity == "" for s in new.sites)
    assert new.verify(model).max_rel <= TOL


def _twin_layers(share: str):
    """Llama whose layer 0 leaves the residual stream unchanged (zero o_proj/down_proj) and
    whose layer 1 copies layer 0's norm and the shared projections: sharing is then exact."""
    entry = zoo.get("llama-eager")
    model = entry.build()
    l0, l1 = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        l0.self_attn.o_proj.weight.zero_()
        l0.mlp.down_proj.weight.zero_()
        l1.input_layernorm.weight.copy_(l0.input_layernorm.weight)
        names = ("k_proj", "v_proj") if share == "kv" else ("q_proj", "k_proj")
        for name in names:
            getattr(l1.self_attn, name).weight.copy_(getattr(l0.self_attn, name).weight)
    return entry, model


@pytest.mark.parametrize("what", ["kv", "attn"])
def test_sharing_identical_layers_is_exact(what):
    entry, model = _twin_layers(what)
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, f"share-{what}:group=2")
    for a, k in [(args, kwargs), *other_shapes(entry)]:
        assert new.verify(model, a, k).max_rel <= TOL
    site = new.sites[1]
    d = site.head_dim * site.num_kv_heads * model.config.hidden_size
    q = site.head_dim * site.num_heads * model.config.hidden_size
    freed = 2 * d if what == "kv" else q + d
    assert prog.parameter_count() - new.parameter_count() == freed
    if what == "kv":
        assert site.kv_source == 0 and site.k_proj is None and site.v_proj is None
        assert "k_proj" not in " ".join(n for n, _ in new.module.named_parameters()
                                        if n.startswith("model.layers.1."))
    else:
        assert site.attn_source == 0 and site.q_proj is None and site.k_proj is None


@pytest.mark.parametrize("what", ["kv", "attn"])
def test_sharing_different_layers_is_not_exact(llama, what):
    _, _, prog = llama
    new = rw.rewrite(prog, f"share-{what}:group=2")
    assert new.verify(prog).max_rel > 1e-4


def test_share_layers_auto_picks_runs_from_calibration(llama):
    _, _, prog = llama
    new = rw.rewrite(prog, "share-kv:group=2,layers=auto", calibration=calibration())
    info = new.manifest["passes"][-1]
    assert info["runs"] == [[0, 1]]  # two layers, one run


def test_best_runs_dynamic_programming():
    from rewriter.passes.share import best_runs

    cost = torch.full((4, 4), 10.0)
    cost[0, 1] = 0.1  # 1 is like 0
    cost[2, 3] = 0.1  # 3 is like 2
    assert best_runs(cost, 2) == [[0, 1], [2, 3]]
    cost = torch.full((4, 4), 10.0)
    cost[1, 2], cost[1, 3], cost[2, 3] = 0.1, 0.1, 0.1
    assert best_runs(cost, 2) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("spec, message", [
    ("sparse", "needs window"),
    ("sparse:window=0", "window='0' is not allowed"),
    ("sparse:window=4,density=0.5", "only goes with heads=auto"),
    ("sparse:heads=auto", "needs density"),
    ("share-kv", "needs group"),
    ("share-kv:group=2,layers=some", "fixed or auto"),
    ("nope:x=1", "unknown variant"),
    ("sparse:window=4,color=red", "unknown key 'color'"),
])
def test_bad_specs_are_one_line_errors(llama, spec, message):
    _, _, prog = llama
    with pytest.raises(rw.SpecError, match=message) as err:
        rw.rewrite(prog, spec)
    assert "\n" not in str(err.value)


def test_calibrated_variant_without_data_says_so(llama):
    _, _, prog = llama
    with pytest.raises(rw.SpecError, match="calibration"):
        rw.rewrite(prog, "sparse:heads=auto,density=0.5")
