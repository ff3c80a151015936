"""The ``rewriter`` command line: `inspect` on the MiniLM zoo model, JSON output, and the mapping
of domain errors to one-line messages and exit codes (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_factories import SoftmaxMLP
from typer.testing import CliRunner

import rewriter.cli.sources as sources
from rewriter.cli.app import app
from rewriter.errors import ModelLoadError, NoAttentionError, SpecError

MINILM = "minilm-l6"
MINILM_LAYERS = 6


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def assert_one_line_error(result, exit_code: int, contains: str = "") -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert contains in lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Help and version: no model is loaded.


def test_help_lists_inspect(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.stdout


def test_inspect_help(runner):
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0
    for option in ("--explain", "--seq-len", "--json"):
        assert option in result.stdout


def test_version(runner):
    import rewriter

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"rewriter {rewriter.__version__}"


def test_help_does_not_import_torch():
    """Building every command's help imports none of torch, transformers, onnx."""
    code = """
import contextlib, io, sys
from rewriter.cli.app import app
for argv in (["--help"], *([c, "--help"] for c in
             ("inspect", "export", "convert", "eval", "demo", "variants"))):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            app(argv, prog_name="rewriter")
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
print(sorted(m for m in ("torch", "transformers", "onnx") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_convert_help_points_to_variants(runner):
    result = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "rewriter variants" in result.stdout


def test_variants_lists_the_registry(runner):
    from rewriter.passes import VARIANTS

    result = runner.invoke(app, ["variants"])
    assert result.exit_code == 0, result.output
    for v in VARIANTS.values():
        for line in v.usage:
            assert line in result.stdout.splitlines()
        assert " ".join(v.summary.split()[:4]) in " ".join(result.stdout.split())


def test_variants_json(runner):
    from rewriter.passes import VARIANTS

    result = runner.invoke(app, ["variants", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["variants"]
    assert [v["name"] for v in doc] == list(VARIANTS)
    for row in doc:
        assert row["usage"] == list(VARIANTS[row["name"]].usage)
        assert row["summary"] == VARIANTS[row["name"]].summary
        assert set(row["keys"]) == set(VARIANTS[row["name"]].keys)


def test_backend_and_target_choices_match_the_registries(runner):
    """The static metavars in --help (no torch at help time) list what the registries hold."""
    from rewriter.cli import options
    from rewriter.codegen import BACKENDS
    from rewriter.codegen.onnx.export import TARGETS

    assert set(options.BACKEND_METAVAR.split("|")) == set(BACKENDS)
    assert set(options.backend_names()) == set(BACKENDS)
    assert set(options.ONNX_TARGET_METAVAR.split("|")) == set(TARGETS)
    assert set(options.onnx_targets()) == set(TARGETS)
    result = runner.invoke(app, ["eval", "x", "--backend", "tpu"])
    assert_one_line_error(result, SpecError.exit_code, "--backend 'tpu'")
    assert all(name in result.stderr for name in BACKENDS)
    result = runner.invoke(app, ["export", "x", "--target", "tflite", "--out", "m.onnx"])
    assert_one_line_error(result, SpecError.exit_code, "--target 'tflite'")
    assert all(name in result.stderr for name in TARGETS)


def test_seq_len_must_be_positive(runner):
    result = runner.invoke(app, ["inspect", MINILM, "--seq-len", "0"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, the error's exit code.


def test_missing_path(runner):
    result = runner.invoke(app, ["inspect", "/nonexistent"])
    assert_one_line_error(result, ModelLoadError.exit_code, "/nonexistent")


def test_directory_without_config(runner, tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert_one_line_error(result, ModelLoadError.exit_code, "config.json")


def test_text_file_named_gguf(runner, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a GGUF file\n")
    result = runner.invoke(app, ["inspect", str(fake)])
    assert_one_line_error(result, ModelLoadError.exit_code, "GGUF")


@pytest.fixture
def no_attention_model(monkeypatch):
    def fake_load(model: str, seq_len: int, batch: int = sources.EXAMPLE_BATCH, **_):
        torch.manual_seed(0)
        return sources.ModelInputs("mlp", SoftmaxMLP().eval(), (torch.randn(batch, seq_len, 8),),
                                   {})

    monkeypatch.setattr(sources, "load_model", fake_load)


def test_no_attention(runner, no_attention_model):
    result = runner.invoke(app, ["inspect", "mlp"])
    assert_one_line_error(result, NoAttentionError.exit_code, "no attention found")


def test_no_attention_explain_lists_rejections(runner, no_attention_model):
    result = runner.invoke(app, ["inspect", "mlp", "--explain"])
    assert result.exit_code == NoAttentionError.exit_code, result.output
    assert "0 attention sites" in result.stdout
    assert "not matched" in result.stdout
    assert "softmax" in result.stdout
    assert result.stderr.strip().startswith("error: no attention found")
    assert "Traceback" not in result.output


def test_no_attention_json(runner, no_attention_model):
    result = runner.invoke(app, ["inspect", "mlp", "--json", "--explain"])
    assert result.exit_code == NoAttentionError.exit_code, result.output
    doc = json.loads(result.stdout)
    assert doc["sites"] == []
    assert len(doc["rejected"]) == 1
    assert set(doc["rejected"][0]) == {"node", "op", "module_path", "reason"}


# ---------------------------------------------------------------------------------------------
# The real MiniLM model (BERT encoder, 6 layers, 12 heads).


@pytest.mark.slow
def test_inspect_minilm(runner):
    result = runner.invoke(app, ["inspect", MINILM, "--explain"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "encoder.layer.0.attention.self" in out
    rows = [ln for ln in out.splitlines() if ".attention.self" in ln]
    assert len(rows) == MINILM_LAYERS
    assert f"{MINILM_LAYERS} attention sites; identity check: ok" in out
    assert f"all {MINILM_LAYERS} softmax/SDPA anchors matched" in out


@pytest.mark.slow
def test_inspect_minilm_json(runner):
    result = runner.invoke(app, ["inspect", MINILM, "--json", "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["num_sites"] == len(doc["sites"]) == MINILM_LAYERS
    assert doc["seq_len"] == 8
    assert all(site["num_heads"] == 12 and site["num_kv_heads"] == 12 for site in doc["sites"])
    assert [site["layer"] for site in doc["sites"]] == list(range(MINILM_LAYERS))
    assert doc["sites"][0]["module_path"] == "encoder.layer.0.attention.self"
    assert doc["rejected"] == []
    assert doc["verify"]["ok"] is True


@pytest.mark.slow
def test_console_script_runs():
    script = Path(sys.executable).parent / "rewriter"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(script), "inspect", MINILM], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "encoder.layer.5.attention.self" in proc.stdout
    assert "Traceback" not in proc.stderr
