"""The backend contract (rewriter.codegen.backend): one registry that Program.compile,
`runner` (eval --backend) and the summary's backend column go through."""

from __future__ import annotations

import pytest
import torch

import rewriter as rw
from rewriter.analysis.quality import logits_fn
from rewriter.codegen import BACKENDS, compile_program, get_backend, runner
from rewriter.codegen.backend import BackendUnavailable, register_backend

zoo = pytest.importorskip("zoo")


@pytest.fixture(scope="module")
def prog():
    return rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 7),), {"use_cache": False})


def test_registry_names_and_contract():
    assert list(BACKENDS) == ["eager", "ort", "triton"]
    for backend in BACKENDS.values():
        ok, why = backend.available()
        assert isinstance(ok, bool) and why
        assert backend.summary


def test_eager_compile_is_the_program(prog):
    new = prog.compile("eager")
    assert [s.backend for s in new.sites] == ["eager"] * len(prog.sites)
    assert new.verify(prog, tolerance=0.0).ok


def test_runners_agree(prog, tmp_path):
    ids = zoo._ids(3, 10, seed=2)
    want = logits_fn(prog)(ids)
    for name in ("eager", "ort"):
        run = runner(prog, name, tmp_path)
        got = logits_fn(prog, run)(ids)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, name
    assert "onnx" not in prog.manifest  # running did not change the program


def test_ort_has_no_graph_op(prog):
    with pytest.raises(rw.SpecError, match="export"):
        prog.compile("ort")


@pytest.fixture
def halves():
    """A toy backend, as a new folder would add it: serves sites with an even index only."""
    calls = []

    @torch.library.custom_op("rewriter_test::attention_counted", mutates_args=())
    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None, *, scale: float,
                is_causal: bool = False, sparsity: str = "", softcap: float = 0.0
                ) -> torch.Tensor:
        calls.append(q.shape)
        return torch.ops.rewriter.attention(q, k, v, attn_mask, scale=scale,
                                            is_causal=is_causal, sparsity=sparsity,
                                            softcap=softcap)

    class Halves:
        name, summary = "halves", "even sites only (a test backend)"
        op = torch.ops.rewriter_test.attention_counted.default

        def available(self):
            return True, "always"

        def supports(self, site, **call):
            return (site.index % 2 == 0, "odd site") if "dtype" in call else (False, "?")

        def lower_site(self, site, **call):  # noqa: ARG002
            return {"lowered": site.index}

        def runner(self, program, workdir):  # noqa: ARG002
            return compile_program(program, self.name).module

    register_backend(Halves())
    yield calls
    del BACKENDS["halves"]


def test_a_registered_backend_is_used_and_reports_fallbacks(prog, halves):
    new = prog.compile("halves")
    assert [s.backend for s in new.sites] == ["halves", "eager"]
    assert new.sites[1].notes[-1] == "halves fallback: odd site"
    assert "halves fallback" not in " ".join(prog.sites[1].notes)  # input untouched
    assert new.manifest["compile"]["sites"][0] == {"backend": "halves", "lowered": 0}
    assert "eager (odd site)" in new.summary()
    assert new.verify(prog, tolerance=1e-6).ok
    assert len(halves) == 1  # one site ran on it


def test_unknown_and_unavailable(monkeypatch):
    with pytest.raises(rw.SpecError, match="allowed: eager, ort, triton"):
        get_backend("cuda")
    monkeypatch.setattr(BACKENDS["ort"], "available", lambda: (False, "no onnxruntime"))
    with pytest.raises(BackendUnavailable, match="no onnxruntime"):
        get_backend("ort")
