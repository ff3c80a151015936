"""The scripts in examples/ run on tiny models and do what their output says: each is imported
from its file and its ``main([...])`` called; its returned results and printed report are
checked (identity error, new KV heads after a reload, ONNX tokens == PyTorch tokens, the HTML
page's canonical node)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """cli_factories' 2-layer Llama (4 heads, 2 KV heads) and MiniLM's tokenizer, saved as a
    Hugging Face directory (config.json, safetensors, tokenizer files)."""
    import cli_factories

    loaded = cli_factories.tiny_llama()
    path = tmp_path_factory.mktemp("tiny-llama")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_every_example_is_documented():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    readme = (EXAMPLES / "README.md").read_text()
    assert {"convert_hf_directory.py", "inspect_site_html.py", "onnx_generate.py",
            "plain_module.py"} <= set(scripts)
    for name in scripts:
        assert f"examples/{name}" in readme
        assert example(name[:-3]).__doc__.strip()


def test_plain_module(capsys):
    plain = example("plain_module")
    result = plain.main([])  # 8 heads -> gqa:kv-heads=2,merge=mean + sparse:window=16,sink=1
    out = capsys.readouterr().out
    assert result["identity_error"] < 1e-8
    assert result["kv_heads"] == [2, 2]
    assert result["parameters"][1] < result["parameters"][0]
    assert 1e-3 < result["variant_error"] < 10  # a real change, measured
    assert result["output_shape"] == (1, 64, 64)
    assert "layers.1" in out and "window=16,sink=1" in out and "identity check: ok" in out

    # the matmul + softmax form; a rewrite that changes nothing must verify as exact
    exact = plain.main(["--core", "matmul", "--kv-heads", "8", "--window", "64"])
    assert "matmul-softmax" in capsys.readouterr().out
    assert exact["identity_error"] < 1e-8 and exact["variant_error"] < 1e-6
    assert exact["kv_heads"] == [8, 8]


def test_convert_hf_directory(tmp_path, capsys):
    out = tmp_path / "converted"
    result = example("convert_hf_directory").main(["--out", str(out)])  # its own tiny Llama
    text = capsys.readouterr().out
    assert result["kv_heads"] == [[2], [1]]
    before, after = result["parameters"]
    assert after < before
    assert result["reload_error"] == 0.0
    assert result["hf_kv_heads"] == 1
    assert {"program.pt2", "manifest.json", "hf"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "hf" / "config.json").read_text())["num_key_value_heads"] == 1
    assert re.search(r"KV heads\s+\[2\] -> \[1\]", text)
    assert f"{before:,} -> {after:,}" in text


def test_onnx_generate(tiny_llama_dir, tmp_path, capsys):
    import transformers

    path = tmp_path / "decoder.onnx"
    result = example("onnx_generate").main(
        ["--model", str(tiny_llama_dir), "--tokens", "6", "--out", str(path)])
    assert path.is_file() and result["ops"] == ["GroupQueryAttention"]
    assert result["same"] and torch.equal(result["ort_tokens"], result["torch_tokens"])
    assert "6 greedy tokens: ONNX Runtime == PyTorch" in capsys.readouterr().out
    # and both are the model's own greedy continuation (transformers, no rewriter)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = result["torch_tokens"][:, :-6]
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(result["torch_tokens"], want)


def test_inspect_site_html(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "site1.html"
    result = example("inspect_site_html").main(
        ["--model", str(tiny_llama_dir), "--site", "1", "--out", str(path)])
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "src=" not in page and "href=" not in page  # self-contained
    assert result["highlight"]["after"] == [result["node"]]  # the canonical node, only
    assert f">{result['node']}</text>" in page
    assert '<text' in page and 'font-weight="bold">rewriter.attention</text>' in page
    assert "model.layers.1.self_attn" in page
    assert any("scaled_dot_product_attention" in n for n in result["highlight"]["before"])
    assert result["nodes"]["before"] > result["nodes"]["after"] > 5
    assert f"wrote {path}" in capsys.readouterr().out
