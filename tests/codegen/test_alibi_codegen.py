"""ALiBi in the Triton kernels: ``slope[head] * key index`` added in-kernel (no bias tensor),
against the naive reference under TRITON_INTERPRET=1 (conftest), and a whole ALiBi model
compiled for Triton against its eager program."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.codegen.triton import BACKEND, KernelSpec, launch, triton_attention
from rewriter.ir.ops import reference_attention

pytest.importorskip("triton")
zoo = pytest.importorskip("zoo")

TOL = 1e-4  # fp32, as the other kernel tests
SLOPES4 = [0.25, 0.0625, 0.015625, 0.00390625]


def _qkv(b, hq, hkv, sq, sk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def _check(q, k, v, mask=None, **attrs):
    attrs = {"scale": q.shape[-1] ** -0.5, **attrs}
    got = triton_attention(q, k, v, mask, block_n=16, **attrs)
    want = reference_attention(q, k, v, mask, **attrs)
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e}"
    # the bias matters at these lengths: without it the kernel would be far off
    plain = {key: val for key, val in attrs.items() if key != "alibi"}
    assert (reference_attention(q, k, v, mask, **plain) - want).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("sq, sk, causal", [(33, 33, True), (7, 40, False), (1, 33, False),
                                            (17, 17, False)])
@pytest.mark.parametrize("hkv", [4, 2])
def test_kernel_alibi_dense(sq, sk, causal, hkv):
    _check(*_qkv(2, 4, hkv, sq, sk, 16), is_causal=causal, alibi=SLOPES4)


@pytest.mark.parametrize("sparsity", ["window=8,sink=2", "window=6,dilation=2"])
def test_kernel_alibi_with_sparsity(sparsity):
    _check(*_qkv(1, 4, 2, 35, 35, 16), is_causal=True, sparsity=sparsity,
           alibi=[2.0 ** -(h + 1) for h in range(4)])


def test_kernel_alibi_with_masks_and_softcap():
    q, k, v = _qkv(2, 4, 4, 9, 20, 16, seed=1)
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    keep[0, ..., :3] = False  # left padding
    _check(q, k, v, keep, alibi=SLOPES4)
    _check(q, k, v, torch.randn(2, 1, 9, 20), alibi=SLOPES4)
    _check(q, k, v, softcap=3.0, alibi=[1.0, 0.5, 0.25, 0.125])


def test_kernel_name_and_key():
    spec = KernelSpec.create(head_dim=16, v_head_dim=16, group=1, dtype=torch.float32,
                             causal=True, softcap=0.0, mask="none", sparsity="", alibi=True)
    plain = KernelSpec.create(head_dim=16, v_head_dim=16, group=1, dtype=torch.float32,
                              causal=True, softcap=0.0, mask="none", sparsity="")
    assert "alibi" in spec.name and "alibi" not in plain.name and spec.key != plain.key


def test_compiled_alibi_model_matches_eager(monkeypatch):
    entry = zoo.get("bloom-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    calls = []
    real = launch.triton_attention
    monkeypatch.setattr(launch, "triton_attention",
                        lambda *a, **kw: calls.append(kw.get("alibi")) or real(*a, **kw))
    fast = prog.compile("triton")
    assert [s.backend for s in fast.sites] == ["triton"] * len(prog.sites)
    assert fast.verify(prog, tolerance=TOL).ok
    assert calls == [SLOPES4] * len(prog.sites)  # the kernels ran, with the slopes
    assert fast.verify(prog, *entry.inputs(1, 13), tolerance=TOL).ok


def test_topk_with_alibi_is_refused():
    entry = zoo.get("bloom-eager")
    prog = rw.capture(entry.build(), *entry.inputs(2, 7))
    site = rw.rewrite(prog, "sparse:topk=1,block=2,sink=1,local=2").sites[0]
    ok, why = BACKEND.supports(site)
    assert not ok and "ALiBi" in why
