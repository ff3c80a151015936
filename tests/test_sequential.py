"""The sequential engine: a program run one layer block at a time equals the program, the cut
follows the layers, and calibrated passes built on it see upstream layers as rewritten."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import rewriter as rw
from rewriter.errors import RewriterError
from rewriter.passes.sequential import Sequential, align, block_path, check_aligned


@pytest.mark.parametrize("path, block", [
    ("model.layers.3.self_attn", "model.layers.3"),
    ("transformer.h.11.attn", "transformer.h.11"),
    ("encoder.layer.0.attention.self", "encoder.layer.0"),
    ("attn", None),
])
def test_block_path(path, block):
    assert block_path(path) == block


@pytest.mark.parametrize("name, blocks", [
    ("llama-sdpa", ["model.layers.0", "model.layers.1"]),
    ("gpt2-eager", ["transformer.h.0", "transformer.h.1"]),
    ("bert-sdpa", ["encoder.layer.0", "encoder.layer.1"]),
    ("t5-sdpa", ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]),
    ("mha", []),  # no layer index: one segment, the whole graph
])
def test_block_by_block_equals_the_program(zoo_captured, name, blocks):
    c = zoo_captured(name)
    seq = Sequential(c.prog.module, c.prog.sites)
    assert seq.blocks == blocks and len(seq) == len(blocks) + 1
    for args, kwargs in [(c.args, c.kwargs), c.entry.inputs(3, 9)]:
        env = seq.start(args, kwargs)
        for i in range(len(seq)):
            with torch.no_grad():  # as the program runs below: the same kernels
                env, produced = seq.run(env, i)
            if i < len(seq) - 1:  # only what later segments read crosses a cut
                assert produced and all(seq.last_use[n] > i for n in produced)
        got = tree_leaves(seq.output(env))
        with torch.no_grad():  # SDPA may take another kernel when weights need gradients
            want = tree_leaves(c.prog.module(*args, **kwargs))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            if isinstance(b, torch.Tensor):
                assert torch.equal(a, b)


def test_observer_sees_each_site_of_its_segment(zoo_captured):
    c = zoo_captured("llama-sdpa")
    seq = Sequential(c.prog.module, c.prog.sites)
    seen = []

    def observer(site, q, k, v, mask, attrs):
        seen.append(site)
        return torch.ops.rewriter.attention(q, k, v, mask, **attrs)

    env = seq.start(c.args, c.kwargs)
    for i in range(len(seq)):
        env, _ = seq.run(env, i, observe=observer if i == 2 else None)
    assert seen == [1] and seq.segment_of_site == {0: 1, 1: 2}


def test_weights_stand_in_and_carry_gradients(zoo_captured):
    """A weight given by ``weights`` replaces the attribute; only it receives gradients (the
    frozen weights are detached)."""
    c = zoo_captured("llama-sdpa")
    seq = Sequential(c.prog.module, c.prog.sites)
    name = c.prog.sites[1].q_proj.weight
    trained = torch.nn.Parameter(torch.zeros_like(dict(c.prog.module.named_parameters())[name]))
    out = seq.forward(c.args, c.kwargs, weights=lambda n: trained if n == name else None)
    out.logits.sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    assert all(p.grad is None for p in c.prog.module.parameters())  # none leaks to the model
    with torch.no_grad():
        assert not torch.equal(out.logits, c.prog.module(*c.args, **c.kwargs).logits)


def test_teacher_runs_on_the_student_inputs(zoo_captured):
    """`align` hands the teacher's next segment the student's values wherever both carry one."""
    c = zoo_captured("llama-sdpa")
    student = rw.rewrite(c.prog, "gqa:kv-heads=1,merge=mean")
    s, t = Sequential(student.module, student.sites), Sequential(c.prog.module, c.prog.sites)
    check_aligned(s, t)
    s_env, t_env = s.start(c.args, c.kwargs), t.start(c.args, c.kwargs)
    s_env, _ = s.run(s_env, 0)
    t_env, _ = t.run(t_env, 0)
    s_env, produced = s.run(s_env, 1)
    aligned = align(t.run(t_env, 1)[0], s_env)
    assert all(aligned[n] is s_env[n] for n in produced if n in aligned)
    with pytest.raises(RewriterError, match="different layer blocks"):
        check_aligned(s, Sequential(c.prog.module, c.prog.sites[:1]))


def _spied_gqa_fit(prog, monkeypatch) -> tuple[list, list]:
    """Run a calibrated gqa fit on ``prog``, recording ("observe", site) for each observed
    batch and ("merge", site) for each merge, and, at each merge, the sites whose activations
    are still held."""
    from rewriter.passes import gqa

    events, held, tables = [], [], []
    observer_of, convert_site = gqa.GqaPass._observer, gqa.GqaPass._convert_site

    def spy_observer(self, wanted, stats, running):
        tables.append(stats)
        inner = observer_of(self, wanted, stats, running)

        def observer(site, *args):
            if site in wanted:
                events.append(("observe", site))
            return inner(site, *args)

        return observer

    def spy_convert(self, program, site, acts, fit, groups=None):
        events.append(("merge", site.index))
        held.append((site.index, sorted(k for t in tables for k in t)))
        return convert_site(self, program, site, acts, fit, groups)

    monkeypatch.setattr(gqa.GqaPass, "_observer", spy_observer)
    monkeypatch.setattr(gqa.GqaPass, "_convert_site", spy_convert)
    calib = [torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    rw.rewrite(prog, "gqa:kv-heads=1,merge=fit", calibration=calib)
    return events, held


def test_gqa_fit_calibrates_layer_by_layer(zoo_captured, monkeypatch):
    """Site 1 is observed only after site 0 is merged: its statistics come from the inputs the
    merged layer 0 produces."""
    events, _ = _spied_gqa_fit(zoo_captured("llama-sdpa").prog, monkeypatch)
    merges = [e for e in events if e[0] == "merge"]
    assert events[:4] == [("observe", 0), ("observe", 0), ("merge", 0), ("observe", 1)]
    assert merges[:2] == [("merge", 0), ("merge", 1)]


def test_gqa_fit_holds_one_layers_statistics(zoo_captured, monkeypatch):
    """A site's recorded activations are dropped once it is merged: when layer 1 is merged,
    nothing of layer 0's is still held (what lets a model larger than memory calibrate)."""
    _, held = _spied_gqa_fit(zoo_captured("llama-sdpa").prog, monkeypatch)
    assert held[:2] == [(0, []), (1, [])]  # each popped before its merge; none left behind


def test_mean_merge_shares_query_and_output_weights(zoo_captured):
    """A mean merge in head order changes only K/V: q and o stay the source's tensors (no
    copy, so a static merge of a mapped checkpoint stays mapped)."""
    from rewriter.ir.graph import fetch_attr

    c = zoo_captured("llama-sdpa")
    new = rw.rewrite(c.prog, "gqa:kv-heads=1,merge=mean")
    for old, site in zip(c.prog.sites, new.sites, strict=True):
        for role in ("q", "o"):
            was = fetch_attr(c.prog.module, getattr(old, f"{role}_proj").weight)
            now = fetch_attr(new.module, getattr(site, f"{role}_proj").weight)
            assert now.data_ptr() == was.data_ptr(), (site.index, role)
        assert fetch_attr(new.module, site.k_proj.weight).shape[0] == site.head_dim
