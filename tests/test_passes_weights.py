"""Variants that change weights: GQA/MQA conversion and head pruning.

Exactness: merging KV heads that are identical within each group changes nothing (both
merges); pruning heads whose o_proj columns are zero changes nothing; parameter counts drop by
exactly the sliced amount; converted programs run at other lengths and batch sizes."""

from __future__ import annotations

import pytest
import torch
import zoo

import rewriter as rw

TOL = 1e-5


def calibration(batches: int = 2, seq: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 100, (1, seq), generator=g) for _ in range(batches)]


def _hidden_calibration(entry, batches: int = 2):
    return [entry.inputs(1, 12) for _ in range(batches)]


def _twin_kv_heads(name: str):
    """A model whose KV heads are identical within each pair (so merging pairs is exact)."""
    entry = zoo.get(name)
    model = entry.build()
    for layer in model.model.layers:
        attn = layer.self_attn
        d = attn.head_dim
        with torch.no_grad():
            for proj in (attn.k_proj, attn.v_proj):
                w = proj.weight.view(-1, d, proj.weight.shape[-1])
                w[1::2] = w[0::2].clone()
                if proj.bias is not None:
                    b = proj.bias.view(-1, d)
                    b[1::2] = b[0::2].clone()
    return entry, model


@pytest.mark.parametrize("name", ["llama-eager", "qwen2-sdpa"])
@pytest.mark.parametrize("merge", ["mean", "fit"])
def test_gqa_of_identical_kv_heads_is_exact(name, merge):
    entry, model = _twin_kv_heads(name)
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, f"gqa:kv-heads=1,merge={merge}", calibration=calibration())
    assert [s.num_kv_heads for s in new.sites] == [1] * len(new.sites)
    for a, k in [(args, kwargs), entry.inputs(3, 9), entry.inputs(1, 16)]:
        assert new.verify(model, a, k).max_rel <= TOL
    # K and V rows halve: 2 KV heads of D=8 over width 32 -> 1, in both projections
    d, width = new.sites[0].head_dim, model.config.hidden_size
    assert prog.parameter_count() - new.parameter_count() == \
        len(new.sites) * 2 * d * width + (len(new.sites) * 2 * d if name == "qwen2-sdpa" else 0)
    info = new.manifest["passes"][-1]
    assert info["kv_cache_bytes_per_token"][1] * 2 == info["kv_cache_bytes_per_token"][0]


def test_gqa_fit_never_loses_to_mean_on_calibration():
    from rewriter.analysis.quality import calibration_loss
    from rewriter.api import calibration_batches

    entry = zoo.get("llama-eager")
    model = entry.build()
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    cal = calibration(batches=3, seq=32)
    mean = rw.rewrite(prog, "gqa:kv-heads=1,merge=mean", calibration=cal)
    fit = rw.rewrite(prog, "gqa:kv-heads=1,merge=fit", calibration=cal)
    batches = calibration_batches(prog, cal)
    assert calibration_loss(fit, prog, batches) <= calibration_loss(mean, prog, batches) + 1e-9
    info = fit.manifest["passes"][-1]
    assert info["calibration_loss"]["fit"] >= 0 and set(info["merge"].values()) <= {"fit", "mean"}


def test_gqa_fit_is_exact_for_rotated_twin_keys():
    """Keys of head 1 = keys of head 0 rotated per RoPE frequency pair: mean-pooling loses,
    the fitted per-pair complex scaling (folded into q) is exact."""
    entry = zoo.get("llama-eager")
    model = entry.build()
    for layer in model.model.layers:
        attn = layer.self_attn
        d = attn.head_dim
        with torch.no_grad():
            w = attn.k_proj.weight.view(-1, d, attn.k_proj.weight.shape[-1])
            theta = torch.linspace(0.3, 2.0, d // 2)
            re, im = w[0, : d // 2].clone(), w[0, d // 2:].clone()
            w[1, : d // 2] = 1.7 * (torch.cos(theta)[:, None] * re - torch.sin(theta)[:, None] * im)
            w[1, d // 2:] = 1.7 * (torch.sin(theta)[:, None] * re + torch.cos(theta)[:, None] * im)
            v = attn.v_proj.weight.view(-1, d, attn.v_proj.weight.shape[-1])
            v[1] = torch.randn(d, d) @ v[0]  # any invertible map of the values: PCA recovers it
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    fit = rw.rewrite(prog, "gqa:kv-heads=1,merge=fit", calibration=calibration())
    mean = rw.rewrite(prog, "gqa:kv-heads=1,merge=mean", calibration=calibration())
    assert fit.verify(model, *entry.inputs(3, 9)).max_rel <= 1e-4
    assert mean.verify(model, *entry.inputs(3, 9)).max_rel > 1e-2


@pytest.mark.parametrize("name", ["gpt2-eager", "gpt-neox-sdpa", "phi3-sdpa", "bert-sdpa",
                                  "t5-sdpa", "mha", "bmm", "einsum-bshd"])
def test_gqa_runs_on_every_layout(name):
    entry = zoo.get(name)
    model = entry.build()
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    token_model = bool(args) and not args[0].is_floating_point() or "input_ids" in kwargs
    cal = calibration() if token_model else _hidden_calibration(entry)
    new = rw.rewrite(prog, "gqa:kv-heads=2,grouping=similarity", calibration=cal)
    assert all(s.num_kv_heads == 2 for s in new.sites)
    for a, k in [entry.inputs(3, 9), entry.inputs(1, 5)]:
        out = new(*a, **k)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        assert all(torch.isfinite(t).all() for t in leaves if t.is_floating_point())
    # the input program is untouched
    assert prog.verify(model).max_rel <= TOL


def test_gqa_rejects_kv_heads_that_do_not_divide():
    entry = zoo.get("llama-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    with pytest.raises(rw.SpecError, match=r"kv-heads=3 .*valid: 1, 2") as err:
        rw.rewrite(prog, "gqa:kv-heads=3,merge=mean")
    assert "\n" not in str(err.value)


def _zero_o_columns(entry_name: str, heads_by_layer: dict[int, list[int]]):
    entry = zoo.get(entry_name)
    model = entry.build()
    for layer, heads in heads_by_layer.items():
        attn = model.model.layers[layer].self_attn
        d = attn.head_dim
        with torch.no_grad():
            for h in heads:
                attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    return entry, model


def test_pruning_heads_with_zero_output_columns_is_exact():
    # llama-eager is GQA (4 query heads, 2 KV heads): whole groups go, so zero heads 2 and 3.
    entry, model = _zero_o_columns("llama-eager", {0: [2, 3], 1: [0, 1]})
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, "prune-heads:heads=0.2;0.3;1.0;1.1")
    for a, k in [(args, kwargs), entry.inputs(3, 9), entry.inputs(1, 16)]:
        assert new.verify(model, a, k).max_rel <= TOL
    d, width = 8, model.config.hidden_size
    # per site: 2 query rows + 2 o columns + 1 KV head in k and v, each D x width
    assert prog.parameter_count() - new.parameter_count() == 2 * (2 + 2 + 1 + 1) * d * width
    assert [(s.num_heads, s.num_kv_heads) for s in new.sites] == [(2, 1), (2, 1)]


def test_magnitude_pruning_finds_the_zeroed_heads():
    entry, model = _zero_o_columns("llama-eager", {1: [2, 3]})
    prog = rw.capture(model, *entry.inputs(2, 7))
    new = rw.rewrite(prog, "prune-heads:ratio=0.25,score=magnitude")
    assert new.manifest["passes"][-1]["removed"] == {1: [2, 3]}
    assert new.verify(model).max_rel <= TOL


@pytest.mark.parametrize("score", ["activation", "gradient"])
def test_data_scores_find_the_zeroed_heads(score):
    entry, model = _zero_o_columns("llama-eager", {0: [0, 1]})
    prog = rw.capture(model, *entry.inputs(2, 7))
    new = rw.rewrite(prog, f"prune-heads:ratio=0.25,score={score}", calibration=calibration())
    assert new.manifest["passes"][-1]["removed"] == {0: [0, 1]}
    assert new.verify(model).max_rel <= TOL


@pytest.mark.parametrize("name, score", [("llama-eager", "gradient"),
                                         ("bert-sdpa", "activation")])
def test_default_score_is_the_best_that_applies(name, score):
    """No score= given: gradient for a language model, activation for an encoder (whose
    outputs have no logits); the manifest says which was used."""
    entry = zoo.get(name)
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    cal = calibration() if name.startswith("llama") else _hidden_calibration(entry)
    new = rw.rewrite(prog, "prune-heads:ratio=0.25", calibration=cal)
    assert new.manifest["passes"][-1]["score"] == score
    assert sum(s.num_heads for s in new.sites) < sum(s.num_heads for s in prog.sites)


def _constant_kv_group(name: str, group: int):
    """Zero the V rows of one KV head of every layer: with a V bias, each query head reading it
    outputs that bias whatever it attends to, a constant the compensation can fold."""
    entry = zoo.get(name)
    model = entry.build()
    for layer in model.model.layers:
        v = layer.self_attn.v_proj
        d = v.weight.shape[0] // HKV_ZOO
        with torch.no_grad():
            v.weight[group * d:(group + 1) * d] = 0
            v.bias[group * d:(group + 1) * d] = torch.linspace(-1, 1, d)
    return entry, model


HKV_ZOO = zoo.HKV


@pytest.mark.parametrize("compensate, exact", [("bias", True), ("none", False)])
def test_prune_compensation_folds_a_constant_head_into_the_bias(compensate, exact):
    """FLAP's compensation: a pruned group whose output is constant is replaced by its mean
    through o_proj's (new) bias, exactly; without it, pruning it changes the outputs."""
    entry, model = _constant_kv_group("qwen2-sdpa", 1)
    args, kwargs = entry.inputs(2, 7)
    prog = rw.capture(model, args, kwargs)
    new = rw.rewrite(prog, f"prune-heads:heads=0.2;0.3;1.2;1.3,compensate={compensate}",
                     calibration=calibration())
    assert new.manifest["passes"][-1]["compensate"] == compensate
    errors = [new.verify(model, a, k).max_rel for a, k in [(args, kwargs), entry.inputs(3, 9)]]
    assert (max(errors) <= TOL) == exact, errors


def test_prune_compensates_by_default_with_data_scores():
    entry = zoo.get("llama-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    cal = calibration()
    for score, expected in [("gradient", "bias"), ("activation", "bias"),
                            ("magnitude", "none")]:
        new = rw.rewrite(prog, f"prune-heads:ratio=0.25,score={score}", calibration=cal)
        assert new.manifest["passes"][-1]["compensate"] == expected
        assert (new.sites[0].o_proj.bias is not None or new.sites[1].o_proj.bias is not None) \
            == (expected == "bias")


def test_pruning_mha_heads_and_relative_bias():
    entry = zoo.get("t5-sdpa")
    model = entry.build()
    prog = rw.capture(model, *entry.inputs(2, 7))
    new = rw.rewrite(prog, "prune-heads:heads=0.1;3.0")
    assert new.sites[0].num_heads == 3 and new.sites[3].num_heads == 3
    for a, k in [entry.inputs(3, 9), entry.inputs(1, 6)]:
        out = new(*a, **k)
        assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("spec, message", [
    ("prune-heads", "exactly one of ratio"),
    ("prune-heads:ratio=1.5", "ratio='1.5' is not allowed"),
    ("prune-heads:ratio=0.2,heads=0.1", "exactly one of"),
    ("prune-heads:heads=0.1", "remove whole groups"),
    ("prune-heads:heads=9.0", "no head 9.0"),
    ("prune-heads:heads=0.0;0.1;0.2;0.3", "no heads left"),
    ("prune-heads:ratio=0.2,score=random", "magnitude, gradient or activation"),
])
def test_prune_errors(spec, message):
    entry = zoo.get("llama-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    with pytest.raises(rw.SpecError, match=message):
        rw.rewrite(prog, spec)
