"""The `heal` variant: it repairs what a rewrite costs on inputs it never trained on, leaves an
exact rewrite alone, keeps the graph and shapes (so save, ONNX and decoders still work), is
deterministic, and refuses what it cannot do with one-line SpecErrors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import rewriter as rw
from rewriter.analysis.quality import calibration_loss
from rewriter.errors import SpecError


def _ids(batches: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (2, seq), generator=g) for _ in range(batches)]


CALIB = _ids(8, 24, seed=1)


def _held_out(prog, batches: int = 4):
    return [prog.call_with_tokens(ids) for ids in _ids(batches, 24, seed=99)]


def _error(prog, teacher, held) -> float:
    return calibration_loss(prog, teacher, held)


@pytest.mark.parametrize("name, spec, heal", [
    ("llama-sdpa", "gqa:kv-heads=1,merge=mean", "heal:steps=60"),
    ("llama-sdpa", "gqa:kv-heads=1,merge=mean", "heal:steps=40,objective=local"),
    ("llama-sdpa", "gqa:kv-heads=1,merge=mean", "heal:steps=40,objective=kd,params=lora:4"),
    ("gpt2-eager", "prune-heads:ratio=0.25,score=magnitude", "heal:steps=60"),
    ("qwen2-sdpa", "share-kv:group=2", "heal:steps=60,params=attention"),
    ("phi3-sdpa", "sparse:window=3,sink=1", "heal:steps=60"),
    ("llama-sdpa", "drop-attn:layers=0", "heal:steps=40,objective=local"),
    ("llama-sdpa", "drop-attn:layers=1", "heal:steps=60"),
])
def test_heal_lowers_the_error_on_held_out_inputs(zoo_captured, name, spec, heal):
    c = zoo_captured(name)
    rewritten = rw.rewrite(c.prog, spec, calibration=CALIB)
    healed = rw.rewrite(rewritten, heal, calibration=CALIB)
    held = _held_out(c.prog)
    before, after = _error(rewritten, c.prog, held), _error(healed, c.prog, held)
    assert after < 0.9 * before, (before, after)
    # same graph, same parameter names and shapes
    shapes = {n: p.shape for n, p in rewritten.module.named_parameters()}
    assert {n: p.shape for n, p in healed.module.named_parameters()} == shapes
    assert [n.target for n in healed.module.graph.nodes] == \
        [n.target for n in rewritten.module.graph.nodes]
    log = healed.manifest["passes"][-1]["heal"]
    assert log["trained_parameters"] > 0 and log["seconds"] >= 0
    # the rewritten program is not touched
    assert _error(rewritten, c.prog, held) == before


def test_heal_of_a_non_language_model(zoo_captured):
    """An encoder: the kd objective is the outputs' relative error."""
    c = zoo_captured("bert-sdpa")
    calib = [c.entry.inputs(2, 12) for _ in range(4)]
    rewritten = rw.rewrite(c.prog, "gqa:kv-heads=1,merge=mean", calibration=calib)
    healed = rw.rewrite(rewritten, "heal:steps=40", calibration=calib)
    held = [c.entry.inputs(3, 9)]
    assert _error(healed, c.prog, held) < 0.9 * _error(rewritten, c.prog, held)


def test_heal_of_an_exact_rewrite_changes_nothing(zoo_captured):
    """A window longer than any input changes no output: every block's error is at rounding
    level, nothing trains, the outputs are bit for bit the rewritten program's."""
    c = zoo_captured("llama-sdpa")
    rewritten = rw.rewrite(c.prog, "sparse:window=1000")
    healed = rw.rewrite(rewritten, "heal:steps=10,params=attention", calibration=CALIB)
    log = healed.manifest["passes"][-1]
    assert not log["changed"]
    assert all(b.get("skipped") for b in log["heal"]["local"]["blocks"])
    assert log["heal"]["kd"].get("skipped")
    for a, b in zip(tree_leaves(healed(*c.args, **c.kwargs)),
                    tree_leaves(rewritten(*c.args, **c.kwargs)), strict=True):
        assert torch.equal(a, b)


def test_heal_is_deterministic(zoo_captured):
    c = zoo_captured("llama-sdpa")
    spec = ["gqa:kv-heads=1,merge=mean", "heal:steps=20,params=lora:2,seed=3"]
    a, b = (rw.rewrite(c.prog, spec, calibration=CALIB) for _ in range(2))
    other = rw.rewrite(c.prog, [spec[0], "heal:steps=20,params=lora:2,seed=4"],
                       calibration=CALIB)
    pa, pb, po = (dict(p.module.named_parameters()) for p in (a, b, other))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], po[n]) for n in pa)


def test_healed_program_saves_exports_and_decodes(tmp_path):
    """The healed program is an ordinary program: it saves and reloads, exports to ONNX (equal
    in ONNX Runtime) and serves a KV-cache decoder (checked in float64 against itself)."""
    pytest.importorskip("onnxruntime")
    import zoo

    from rewriter import onnx as rwonnx

    ids = zoo._ids(2, 9)
    prog = rw.capture(zoo.get("llama-sdpa").build(), (ids,), {"use_cache": False})
    healed = rw.rewrite(prog, ["gqa:kv-heads=1,merge=mean", "heal:steps=20"],
                        calibration=CALIB)
    healed.save(tmp_path / "out")
    loaded = rw.load(tmp_path / "out")
    assert loaded.verify(healed).max_rel <= 1e-6
    assert "heal" in loaded.manifest["passes"][-1]
    generated = healed.decoder().generate(ids[:1, :5], 3)
    assert generated.shape == (1, 8)
    rwonnx.export_onnx(healed, tmp_path / "model.onnx", "ort")
    sess = rwonnx.session(tmp_path / "model.onnx", threads=1)
    (got,) = rwonnx.run(sess, ids, use_cache=False)
    with torch.no_grad():
        want = healed(ids, use_cache=False).logits
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("specs, message", [
    (["gqa:kv-heads=1", "heal:tokens=0"], "tokens='0' is not allowed"),
    (["gqa:kv-heads=1", "heal:tokens=1k,steps=3"], "give one budget"),
    (["gqa:kv-heads=1", "heal:params=lora:0"], "params='lora:0' is not allowed"),
    (["gqa:kv-heads=1", "heal:objective=mse"], "objective='mse' is not allowed"),
    (["gqa:kv-heads=1", "heal:lr=-1"], "lr='-1' is not allowed"),
    (["heal:steps=3"], "put it after the variants it heals"),
])
def test_heal_errors(zoo_captured, specs, message):
    c = zoo_captured("llama-sdpa")
    with pytest.raises(SpecError, match=message):
        rw.rewrite(c.prog, specs, calibration=CALIB)


def test_heal_needs_the_program_before_the_rewrite(zoo_captured, tmp_path):
    c = zoo_captured("llama-sdpa")
    rw.rewrite(c.prog, "gqa:kv-heads=1,merge=mean").save(tmp_path / "saved")
    with pytest.raises(SpecError, match="rewrite and heal in one call"):
        rw.rewrite(rw.load(tmp_path / "saved"), "heal:steps=3", calibration=CALIB)


def test_heal_refuses_a_compiled_program(zoo_captured, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    c = zoo_captured("llama-sdpa")
    compiled = rw.rewrite(c.prog, "gqa:kv-heads=1,merge=mean").compile("triton")
    with pytest.raises(SpecError, match="compiled for a backend"):
        rw.rewrite(compiled, "heal:steps=3", calibration=CALIB)


def test_progress_reports_the_running_loss(zoo_captured):
    """A callback taking ``status=`` sees heal's running loss; a three-argument one still
    works."""
    c = zoo_captured("llama-sdpa")
    seen, plain = [], []
    rw.rewrite(c.prog, ["gqa:kv-heads=1,merge=mean", "heal:steps=4"], calibration=CALIB,
               progress=lambda task, done, total, status="": seen.append((task, status)))
    rw.rewrite(c.prog, ["gqa:kv-heads=1,merge=mean", "heal:steps=2"], calibration=CALIB,
               progress=lambda task, done, total: plain.append(task))
    assert any("error" in status for task, status in seen if task.endswith("local"))
    assert any("KL" in status for task, status in seen if task.endswith("kd"))
    assert any(task.endswith("kd") for task in plain)
