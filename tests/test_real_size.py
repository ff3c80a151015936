"""Models of real size (issue #15): ONNX with external data, saved directories that hold each
tensor once, hub ids from the local cache. The > 2 GiB export is marked slow."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import transformers
import zoo
from attn_testlib import output_tensors

import rewriter as rw
from rewriter import onnx as rwonnx
from rewriter.analysis.verify import compare_outputs
from rewriter.codegen.onnx.export import data_path
from rewriter.errors import ModelLoadError

TOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    """Weights of several MB (mostly embedding), so that the data file dwarfs the graph."""
    return rw.capture(wide_llama(vocab=8000), (zoo._ids(2, 7),), {"use_cache": False})


def wide_llama(vocab: int = 32000, hidden: int = 128, layers: int = 2, tied: bool = False,
               dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A random Llama whose weights are mostly embedding (several MB), so that file sizes are
    dominated by the weights rather than the graph."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def ort_equals_program(prog: rw.Program, path, shapes=((2, 7), (1, 12))) -> None:
    sess = rwonnx.session(path, threads=1)
    for batch, seq in shapes:
        ids = zoo._ids(batch, seq, seed=seq)
        with torch.no_grad():
            want = output_tensors(prog.module(ids, use_cache=False))
        report = compare_outputs(rwonnx.run(sess, ids, use_cache=False), want, 1e-4)
        assert report.ok, report


# --- ONNX external data ----------------------------------------------------------------------

@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_external_data_on_request(llama, tmp_path, target):
    """A small model forced to external data: model.onnx + model.onnx.data, checked by path,
    equal to the program in ONNX Runtime; the manifest names the data file."""
    path = tmp_path / "m.onnx"
    rwonnx.export_onnx(llama, path, target, external_data=True)
    assert data_path(path).is_file()
    assert data_path(path).stat().st_size > 0.9 * weight_bytes(llama.module)
    assert path.stat().st_size < data_path(path).stat().st_size  # the graph, no weights
    onnx.checker.check_model(str(path))
    assert json.loads((tmp_path / "m.onnx.json").read_text())["external_data"] == "m.onnx.data"
    ort_equals_program(llama, path)
    # exported again without: one self-contained file, the stale data removed
    rwonnx.export_onnx(llama, path, target, external_data=False)
    assert not data_path(path).exists()
    ort_equals_program(llama, path)


def test_decoder_with_external_data(llama, tmp_path):
    path = tmp_path / "d.onnx"
    rwonnx.export_onnx(llama, path, "ort", kv_cache=True, external_data=True)
    assert data_path(path).is_file()
    sess = rwonnx.session(path, threads=1)
    prompt = zoo._ids(1, 5, seed=3)
    from rewriter.decoder import greedy_reference

    assert torch.equal(torch.as_tensor(rwonnx.generate(sess, prompt, 6)),
                       greedy_reference(llama, prompt, 6))


def test_default_is_inline_below_the_threshold(llama, tmp_path):
    rwonnx.export_onnx(llama, tmp_path / "m.onnx", "onnx")
    assert not data_path(tmp_path / "m.onnx").exists()


def test_failed_export_leaves_nothing(llama, tmp_path, monkeypatch):
    from rewriter.codegen.onnx import export as export_mod

    def broken(model, path, **kwargs):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod.ir, "save", broken)
    with pytest.raises(OSError, match="No space"):
        rwonnx.export_onnx(llama, tmp_path / "m.onnx", "onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_model_over_2gb_exports_with_external_data(tmp_path):
    """A 2.3 GB (fp32) model: automatic external data, onnx.checker by path, ORT equal to the
    program (one layer; the weights are mostly embedding and LM head)."""
    model = wide_llama(vocab=65536, hidden=4096, layers=1)
    assert weight_bytes(model) > 2 * 1024 ** 3
    prog = rw.capture(model, (zoo._ids(1, 5),), {"use_cache": False})
    del model
    path = tmp_path / "big.onnx"
    rwonnx.export_onnx(prog, path, "ort")
    assert data_path(path).stat().st_size > 2 * 1024 ** 3
    assert path.stat().st_size < 10 * 1024 ** 2
    onnx.checker.check_model(str(path))
    ort_equals_program(prog, path, shapes=((1, 6),))


# --- saved directories: each tensor once -----------------------------------------------------

def directory_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("spec, hf", [("gqa:kv-heads=1,merge=mean", True),
                                      ("sparse:window=3,sink=1", False)])
@pytest.mark.parametrize("tied", [False, True])
def test_saved_directory_holds_each_tensor_once(tmp_path, spec, hf, tied):
    """hf/ written or not, tied or not: the directory is about the weight bytes (the graph
    and manifest add little), and it loads back exact."""
    model = wide_llama(tied=tied)
    prog = rw.rewrite(rw.capture(model, (zoo._ids(2, 7),), {"use_cache": False}), spec)
    manifest = prog.save(tmp_path / "out")
    assert manifest["hf"]["written"] is hf
    files = manifest["weights"]["files"]
    assert ("hf/model.safetensors" in files) is hf
    total = directory_bytes(tmp_path / "out")
    assert total <= 1.1 * weight_bytes(prog.module), (total, weight_bytes(prog.module))
    assert (tmp_path / "out" / "program.pt2").stat().st_size < 0.1 * total
    loaded = rw.load(tmp_path / "out")
    ids = zoo._ids(3, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits,
                                   prog(ids, use_cache=False).logits, rtol=0, atol=0)
    if hf:
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, prog(ids, use_cache=False).logits,
                                       rtol=TOL, atol=TOL)


def test_damaged_weights_are_a_clear_error(tmp_path, llama):
    llama.save(tmp_path / "out")
    weights = tmp_path / "out" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="weights"):
        rw.load(tmp_path / "out")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="weights.safetensors is missing"):
        rw.load(tmp_path / "out")


def test_streamed_safetensors_read_by_the_library(tmp_path):
    """rewriter.io.tensors writes what safetensors reads: every dtype, views, 0-d, empty."""
    from safetensors.torch import load_file

    from rewriter.io.tensors import write_safetensors

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"f32": base, "view": base.t(), "bf16": base.to(torch.bfloat16),
               "f16": base[1:3].to(torch.float16), "i64": torch.arange(5),
               "bool": base > 3, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "t.safetensors", tensors.items(), {"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


# --- hub ids ---------------------------------------------------------------------------------

def fake_hub_cache(root, repo_id: str, model, revision: str = "main",
                   commit: str = "0" * 40):
    """The Hugging Face cache layout: models--org--name/{refs/<rev>, snapshots/<commit>/},
    with the model and a real tokenizer (MiniLM's)."""
    from cli_factories import minilm_tokenizer

    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
    minilm_tokenizer().save_pretrained(repo / "snapshots" / commit)
    return repo


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rewriter.models import load

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = wide_llama(vocab=128, layers=1)
    fake_hub_cache(tmp_path, "acme/tiny-llama", model, revision="v1", commit="a" * 40)
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load("acme/tiny-llama", revision="v9")  # not cached: the error names the cache
    loaded = load("acme/tiny-llama", revision="v1")
    assert loaded.name == "acme/tiny-llama"
    ids = zoo._ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load("acme/other")
    with pytest.raises(ModelLoadError, match="--revision"):
        load(str(tmp_path), revision="v1")


# --- the command line: --dtype, --revision, --external-data ----------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a real tokenizer, as a Hugging Face directory."""
    from cli_factories import minilm_tokenizer, tiny_llama_model

    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama_model().save_pretrained(path, safe_serialization=True)
    minilm_tokenizer().save_pretrained(path)
    return path


def cli(*argv):
    from typer.testing import CliRunner

    from rewriter.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in argv])


def one_line_error(result, code: int, contains: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], \
        result.stderr


def test_cli_convert_in_bfloat16(hf_dir, tmp_path):
    result = cli("convert", hf_dir, "--dtype", "bfloat16", "-v", "gqa:kv-heads=1,merge=mean",
                 "--out", tmp_path / "out", "--no-verify")
    assert result.exit_code == 0, result.output
    loaded = rw.load(tmp_path / "out")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert hf.config.num_key_value_heads == 1
    one_line_error(cli("inspect", hf_dir, "--dtype", "int8"), 2, "unknown dtype 'int8'")
    one_line_error(cli("inspect", "cli_factories:tiny_llama", "--dtype", "bfloat16"), 1,
                   "apply to checkpoints")


def test_cli_hub_id_and_revision(hf_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "acme/tiny", transformers.AutoModelForCausalLM
                   .from_pretrained(hf_dir), revision="v2", commit="b" * 40)
    result = cli("inspect", "acme/tiny", "--revision", "v2", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["sites"]) == 2
    one_line_error(cli("inspect", "acme/tiny", "--revision", "v3"), 2, str(tmp_path))
    one_line_error(cli("inspect", "acme/other"), 2, "not in the Hugging Face cache")


def test_cli_export_external_data(hf_dir, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli("export", hf_dir, "--out", out, "--external-data")
    assert result.exit_code == 0, result.output
    assert data_path(out).is_file() and "m.onnx.data" in result.stdout
