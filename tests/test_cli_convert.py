"""`rewriter convert / inspect / eval / demo` on tiny models (``cli_factories:NAME``), and the
safety rules: every bad input is one line on stderr, a non-zero exit, no traceback and no
partial output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewriter.cli.app import app
from rewriter.errors import ModelLoadError, NoAttentionError, SpecError
from rewriter.io.atomic import OutputExistsError

TINY = "cli_factories:tiny_llama"  # LoadedModel: has a tokenizer
BARE = "cli_factories:tiny_llama_bare"  # (module, args, kwargs)
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def assert_one_line_error(result, exit_code: int, contains: str = "") -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert contains.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output


def no_leftovers(parent: Path, name: str) -> bool:
    """No output and no temporary sibling of it."""
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """tiny llama -> gqa:kv-heads=1 + sparse, with an ONNX file (converted once)."""
    out = tmp_path_factory.mktemp("convert") / "tiny-gqa1-sparse"
    result = CliRunner().invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1", "-v",
                                      "sparse:window=8,sink=1", "--out", str(out),
                                      "--onnx", "ort", "--ctx", "64"])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------------------------------
# convert


def test_convert_writes_checkpoint(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"program.pt2", "manifest.json", "inputs.safetensors", "model.onnx"} <= names
    assert not any(n.startswith(".") for n in names)
    m = json.loads((converted / "manifest.json").read_text())
    assert [p["spec"] if isinstance(p, dict) and "spec" in p else p for p in m["passes"]]
    assert [s["num_kv_heads"] for s in m["before"]["sites"]] == [2, 2]
    assert [s["num_kv_heads"] for s in m["sites"]] == [1, 1]
    assert all(s["sparsity"] for s in m["sites"])
    assert m["before"]["kv_cache_bytes_per_token"] == 2 * m["kv_cache_bytes_per_token"]
    assert m["before"]["parameters"] > m["parameters"]
    assert m["before"]["model"] == TINY
    assert m["verification"]["max_rel"] > 0
    ppl = m["quality"]["perplexity"]
    assert len(ppl) == 2 and all(p > 1 for p in ppl)
    assert m["hf"]["written"] is False  # sparse masks have no transformers config field
    assert m["onnx"]["path"] == "model.onnx"


def test_convert_gqa_writes_hf(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1,merge=mean",
                                 "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (out / "hf" / "config.json").is_file()
    assert json.loads((out / "hf" / "config.json").read_text())["num_key_value_heads"] == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"] is None and "quality" not in m
    assert "2 -> 2" in result.stdout and "KV cache" in result.stdout


def test_convert_json_and_calib_file(runner, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The attention mechanism relates every token to every other token. " * 400)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1", "--calib", str(calib),
                                 "--out", str(out), "--no-verify", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["out"] == str(out)
    assert doc["sites"][0]["num_kv_heads"] == 1


def test_convert_with_heal(runner, tmp_path):
    """`-v ... -v heal:...` heals after converting (calibration text from --calib); the
    manifest records the budget, the steps and the loss."""
    calib = tmp_path / "calib.txt"
    calib.write_text("Attention relates every token to every other token in the window. " * 600)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1,merge=mean",
                                 "-v", "heal:steps=4,objective=kd", "--calib", str(calib),
                                 "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    heal = m["passes"][-1]["heal"]
    assert heal["budget"] == {"steps": 4} and heal["kd"]["steps"] == 4
    assert len(heal["kd"]["loss_curve"]) >= 1


def test_convert_heal_first_is_one_line_error(runner, tmp_path):
    result = runner.invoke(app, ["convert", TINY, "-v", "heal:steps=4", "--out",
                                 str(tmp_path / "out")])
    assert_one_line_error(result, 2, "put it after the variants it heals")
    assert not (tmp_path / "out").exists()


def test_convert_bare_factory(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", BARE, "-v", "prune-heads:ratio=0.5,score=magnitude",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["max_rel"] > 0 and "quality" not in m  # no tokenizer


# ---------------------------------------------------------------------------------------------
# inspect a saved directory, render a site, diff two programs; eval


def test_inspect_saved_dir(runner, converted):
    result = runner.invoke(app, ["inspect", str(converted)])
    assert result.exit_code == 0, result.output
    assert "2 attention sites; loaded from disk" in result.stdout
    assert "window=8,sink=1" in result.stdout


def test_inspect_site_details(runner, converted):
    result = runner.invoke(app, ["inspect", str(converted), "--site", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_kv_heads"] == 1


@pytest.mark.parametrize("fmt", ["dot", "html"])
def test_inspect_graph(runner, tmp_path, fmt):
    out = tmp_path / f"site.{fmt}"
    result = runner.invoke(app, ["inspect", TINY, "--site", "1", "--graph", fmt,
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "rewriter.attention" in text
    assert "site 1 before" in text and "site 1 after" in text
    if fmt == "dot":
        assert text.startswith("digraph") and "#ffd54f" in text  # the highlighted node
    else:
        assert text.startswith("<!DOCTYPE html>") and "<svg" in text


def test_inspect_graph_svg(runner, tmp_path):
    if shutil.which("dot") is None:
        result = runner.invoke(app, ["inspect", TINY, "--graph", "svg"])
        assert_one_line_error(result, 1, "graphviz")
        return
    result = runner.invoke(app, ["inspect", TINY, "--graph", "svg"])
    assert result.exit_code == 0 and "<svg" in result.stdout


def test_inspect_bad_site(runner):
    result = runner.invoke(app, ["inspect", TINY, "--site", "7"])
    assert_one_line_error(result, SpecError.exit_code, "--site 7")


def test_inspect_diff(runner, converted):
    result = runner.invoke(app, ["inspect", TINY, "--diff", str(converted)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2 site(s) changed" in out
    assert "num_kv_heads 2->1" in out and "sparsity" in out
    assert "reshaped" in out and "k_proj.weight" in out
    result = runner.invoke(app, ["inspect", TINY, "--diff", str(converted), "--json"])
    doc = json.loads(result.stdout)
    assert doc["parameters"][0] > doc["parameters"][1]
    assert len(doc["parameter_changes"]["reshaped"]) == 4  # k and v of both layers


@pytest.mark.parametrize("backend", ["eager", "ort"])
def test_eval(runner, converted, backend):
    # The saved directory has no tokenizer: it is reloaded from the source in the manifest.
    result = runner.invoke(app, ["eval", str(converted), "--ctx", "32", "--windows", "2",
                                 "--backend", backend, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["perplexity"] > 1 and doc["tokens_per_s"] > 0


def test_eval_backends_agree(runner, converted):
    ppl = [json.loads(runner.invoke(app, ["eval", str(converted), "--ctx", "32", "--windows",
                                          "1", "--backend", b, "--json"]).stdout)["perplexity"]
           for b in ("eager", "ort")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-3)


def test_eval_text_file(runner, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Plain words for a small test of perplexity on a given text file. " * 50)
    result = runner.invoke(app, ["eval", TINY, "--text", str(text), "--ctx", "32",
                                 "--windows", "2"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton backend works here")
def test_eval_triton_without_gpu(runner, monkeypatch):
    # tests/codegen turns Triton's CPU interpreter on for its session; this test wants it off
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = runner.invoke(app, ["eval", TINY, "--backend", "triton", "--ctx", "16",
                                 "--windows", "1"])
    assert_one_line_error(result, 1, "triton")


def test_eval_needs_a_language_model(runner):
    result = runner.invoke(app, ["eval", BARE])
    assert_one_line_error(result, 1, "tokenizer")


def test_demo_on_tiny_model(runner):
    result = runner.invoke(app, ["demo", "--model", TINY, "--ctx", "32", "--windows", "1",
                                 "--calib-tokens", "16"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for key in ("inspect", "parameters", "KV cache", "verify", "perplexity", "healed",
                "heal:objective=kd", "model.onnx", "ONNX Runtime"):
        assert key in out, out
    diff = float(out.split("max |ort - torch|")[1].split(":")[1].split()[0])
    assert diff < 1e-3


# ---------------------------------------------------------------------------------------------
# export


def test_export_model(runner, tmp_path):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", BARE, "--out", str(out), "--target", "ort"])
    assert result.exit_code == 0, result.output
    assert out.exists() and Path(f"{out}.json").exists()
    assert "2 attention sites (2 x GroupQueryAttention)" in result.stdout


def test_export_defaults_to_one_graph_for_causal_lms(runner, tmp_path):
    """A causal LM exports as the decoder step (prefill is the step over an empty past);
    --no-kv-cache gives the prefill-only graph."""
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", BARE, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kv_cache"] and doc["path"] == str(out)
    manifest = json.loads(Path(f"{out}.json").read_text())
    assert "past_key_0" in manifest["inputs"] and "present_key_0" in manifest["outputs"]
    out = tmp_path / "prefill.onnx"
    result = runner.invoke(app, ["export", BARE, "--no-kv-cache", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert not json.loads(result.stdout)["kv_cache"]
    assert not any(n.startswith("past_") for n in
                   json.loads(Path(f"{out}.json").read_text())["inputs"])


def test_export_last_position_logits(runner, tmp_path):
    """--logits last: the decoder's logits are the last position's only; a value outside
    all|last, or last without a KV cache, is a one-line error that writes nothing."""
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", BARE, "--logits", "last", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "last position's logits only" in result.stdout
    assert json.loads(Path(f"{out}.json").read_text())["logits"] == "last"
    bad = tmp_path / "bad"
    bad.mkdir()
    result = runner.invoke(app, ["export", BARE, "--logits", "first", "--out",
                                 str(bad / "m.onnx")])
    assert_one_line_error(result, 2, "--logits 'first': allowed values are all, last")
    result = runner.invoke(app, ["export", BARE, "--no-kv-cache", "--logits", "last", "--out",
                                 str(bad / "m.onnx")])
    assert_one_line_error(result, 1, "logits='last' is for decoders")
    assert list(bad.iterdir()) == []


def test_export_decoder_from_saved_dir(runner, converted, tmp_path):
    """A converted checkpoint (GQA + sparse) exported as a decoder: ONNX Runtime generates
    what the saved program generates without a cache."""
    import rewriter as rw
    from rewriter import onnx as rwonnx
    from rewriter.decoder import greedy_reference

    out = tmp_path / "decoder.onnx"
    result = runner.invoke(app, ["export", str(converted), "--kv-cache", "--target", "onnx",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kv_cache"] and all(row["kv_cache"] for row in doc["sites"])
    prompt = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(2))
    want = greedy_reference(rw.load(converted), prompt, 8)
    assert torch.equal(rwonnx.generate(rwonnx.session(out), prompt, 8), want)


@pytest.mark.slow
def test_convert_minilm_prune_uses_the_score_that_applies(runner, tmp_path):
    """No score= on an encoder: activation scores (gradient needs logits), recorded."""
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["convert", "minilm-l6", "-v", "prune-heads:ratio=0.25",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    prune = json.loads(result.stdout)["passes"][-1]
    assert prune["spec"] == "prune-heads:ratio=0.25" and prune["score"] == "activation"
    assert prune["heads_removed"] == 18  # a quarter of 6 x 12 heads


def test_export_kv_cache_refused_for_encoder(runner, tmp_path):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "minilm-l6", "--kv-cache", "--out", str(out)])
    assert_one_line_error(result, 1, "causal self-attention only")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Safety: one line, non-zero exit, nothing written.


@pytest.mark.parametrize("spec,contains", [
    ("nope:x=1", "nope"),                     # unknown spec
    ("gqa:heads=1", "heads"),                 # unknown key
    ("gqa:kv-heads=zero", "kv-heads"),        # bad value
    ("sparse:window=-3", "window"),
])
def test_bad_spec(runner, tmp_path, spec, contains):
    result = runner.invoke(app, ["convert", TINY, "-v", spec, "--out", str(tmp_path / "o")])
    assert_one_line_error(result, SpecError.exit_code, contains)
    assert no_leftovers(tmp_path, "o")


def test_kv_heads_not_dividing(runner, tmp_path):
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=3", "--out",
                                 str(tmp_path / "o")])
    assert_one_line_error(result, SpecError.exit_code, "kv-heads")
    assert no_leftovers(tmp_path, "o")


def test_no_attention(runner, tmp_path):
    result = runner.invoke(app, ["convert", "cli_factories:no_attention", "-v",
                                 "gqa:kv-heads=1", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, NoAttentionError.exit_code, "no attention")
    assert no_leftovers(tmp_path, "o")


def test_factory_errors(runner, tmp_path):
    result = runner.invoke(app, ["inspect", "cli_factories:not_a_model"])
    assert_one_line_error(result, ModelLoadError.exit_code, "factory must return")
    result = runner.invoke(app, ["inspect", "no_such_module_xyz:build"])
    assert_one_line_error(result, ModelLoadError.exit_code, "no_such_module_xyz")


def test_not_a_checkpoint(runner, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    result = runner.invoke(app, ["convert", str(f), "-v", "gqa:kv-heads=1", "--out",
                                 str(tmp_path / "o")])
    assert_one_line_error(result, ModelLoadError.exit_code, "not a model file")
    half = tmp_path / "half"  # program.pt2 that is not one
    half.mkdir()
    (half / "program.pt2").write_bytes(b"garbage")
    (half / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["inspect", str(half)])
    assert_one_line_error(result, ModelLoadError.exit_code, "cannot read the saved program")


def test_missing_path(runner, tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), "-v", "gqa:kv-heads=1",
                                 "--out", str(tmp_path / "o")])
    assert_one_line_error(result, ModelLoadError.exit_code, "no such model")
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1", "--calib",
                                 str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, ModelLoadError.exit_code, "--calib")
    assert no_leftovers(tmp_path, "o")


@pytest.fixture
def minilm_copy(tmp_path) -> Path:
    from rewriter.models import ZOO, zoo_path

    src = zoo_path(ZOO["minilm-l6"])
    dst = tmp_path / "minilm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx", "openvino", "*.onnx"))
    return dst


def test_truncated_safetensors(runner, minilm_copy):
    weights = minilm_copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    result = runner.invoke(app, ["inspect", str(minilm_copy)])
    assert_one_line_error(result, ModelLoadError.exit_code, "cannot load")


def test_truncated_gguf(runner, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(64))
    result = runner.invoke(app, ["inspect", str(f)])
    assert_one_line_error(result, ModelLoadError.exit_code, "model.gguf")


@pytest.fixture
def pickle_checkpoint(tmp_path) -> Path:
    """A Hugging Face directory with pytorch_model.bin only (and MiniLM's tokenizer)."""
    from cli_factories import minilm_tokenizer, tiny_llama_model

    d = tmp_path / "pickled"
    model = tiny_llama_model()
    model.save_pretrained(d)  # transformers 5 writes safetensors only: swap in a pickle
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    minilm_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors")) and list(d.glob("*.bin"))
    return d


def test_pickle_refused_then_trusted(runner, pickle_checkpoint):
    result = runner.invoke(app, ["inspect", str(pickle_checkpoint)])
    assert_one_line_error(result, ModelLoadError.exit_code, "--trust-pickle")
    result = runner.invoke(app, ["inspect", str(pickle_checkpoint), "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert "2 attention sites; identity check: ok" in result.stdout


def test_pickle_trusted_uses_weights_only(monkeypatch, pickle_checkpoint):
    """--trust-pickle reads the file with torch.load(weights_only=True), never a full unpickle."""
    from rewriter import models

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    models.load(str(pickle_checkpoint), trust_pickle=True)
    assert calls and all(w is True for w in calls)


def test_existing_out_refused_and_untouched(runner, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1", "--out", str(out)])
    assert_one_line_error(result, OutputExistsError.exit_code, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_force_replaces(runner, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = runner.invoke(app, ["convert", BARE, "-v", "gqa:kv-heads=1,merge=mean", "--out",
                                 str(out), "--force", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "program.pt2").is_file()
    assert no_leftovers(tmp_path, ".out.old")


def test_failed_write_leaves_nothing(runner, tmp_path, monkeypatch):
    import rewriter.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(checkpoint, "save_inputs", disk_full)
    result = runner.invoke(app, ["convert", BARE, "-v", "gqa:kv-heads=1,merge=mean", "--out",
                                 str(tmp_path / "out"), "--no-verify", "--onnx", "onnx"])
    assert_one_line_error(result, 1, "No space left on device")
    assert no_leftovers(tmp_path, "out")


def test_failed_write_keeps_existing_output(runner, tmp_path, monkeypatch):
    import rewriter.checkpoint as checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    monkeypatch.setattr(checkpoint, "write_hf", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    result = runner.invoke(app, ["convert", BARE, "-v", "gqa:kv-heads=1,merge=mean", "--out",
                                 str(out), "--no-verify", "--force"])
    assert_one_line_error(result, 1, "Input/output error")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert no_leftovers(tmp_path, ".out")  # no temporary siblings either


def test_bad_onnx_target_and_backend(runner, tmp_path):
    result = runner.invoke(app, ["convert", TINY, "-v", "gqa:kv-heads=1", "--onnx", "tflite",
                                 "--out", str(tmp_path / "o")])
    assert_one_line_error(result, SpecError.exit_code, "onnx, ort")
    result = runner.invoke(app, ["eval", TINY, "--backend", "tpu"])
    assert_one_line_error(result, SpecError.exit_code, "eager, triton, ort")


# ---------------------------------------------------------------------------------------------
# The installed console script, in a real subprocess.


def console(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "rewriter"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_console_script_convert_and_errors(tmp_path):
    out = tmp_path / "out"
    proc = console("convert", BARE, "-v", "gqa:kv-heads=1,merge=mean", "--out", str(out),
                   "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache       128 -> 64" in proc.stdout
    assert (out / "program.pt2").is_file()
    assert proc.stderr.strip() == ""  # no warnings, no progress bars when piped
    proc = console("convert", BARE, "-v", "gqa:kv-heads=1", "--out", str(out))
    assert proc.returncode == OutputExistsError.exit_code
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
