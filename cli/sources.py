"""What a MODEL argument names, turned into a Program.

MODEL is one of: a zoo name, a Hugging Face directory (safetensors; pickle weights only with
``trust_pickle``), a ``.gguf`` file, a directory written by ``Program.save`` / ``rewriter
convert``, or ``pkg.module:factory``, a callable returning ``(module, args)``,
``(module, args, kwargs)`` or a ``rewriter.models.LoadedModel`` (which brings a tokenizer).

A saved directory has no tokenizer of its own. ``rewriter convert`` records where the model
came from in the manifest (``before.model``); `tokenizer_for_saved` reloads the tokenizer from
``hf/`` when it was written, else from that source (a zoo name or a path), so ``eval`` and a
text ``--calib`` work on converted checkpoints too.

`open_model` turns any of them into a Program (loading or capturing it); `load_model` is the
checkpoint half, module-level so tests can replace it.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from rewriter.errors import ModelLoadError, RewriterError

if TYPE_CHECKING:
    import torch

    from rewriter.cli.progress import Reporter
    from rewriter.program import Program

FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
EXAMPLE_BATCH = 2  # token windows in the example inputs a model is captured with


@dataclass
class Source:
    """A MODEL argument, resolved: ``kind`` is saved, factory or checkpoint."""

    text: str
    kind: str

    @property
    def reference(self) -> str:
        """How to find the model again later (an absolute path for paths)."""
        if self.kind == "factory" or (self.kind == "checkpoint" and not _is_path(self.text)):
            return self.text
        return str(Path(self.text).expanduser().resolve())


def _is_path(text: str) -> bool:
    from rewriter.io.hub import looks_like_hub_id
    from rewriter.models import ZOO

    return text not in ZOO and not looks_like_hub_id(text)


def is_saved_program(path: Path) -> bool:
    return path.is_dir() and (path / "program.pt2").is_file() and \
        (path / "manifest.json").is_file()


def classify(text: str) -> Source:
    path = Path(text).expanduser()
    if is_saved_program(path):
        return Source(text, "saved")
    if not path.exists() and FACTORY.match(text):
        return Source(text, "factory")
    return Source(text, "checkpoint")


def call_factory(text: str):
    """Import ``pkg.module`` and call ``factory()``; normalize the result."""
    from rewriter import models

    module_name, _, attr = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"no such model: {text!r} is not a path, and module "
                             f"{module_name!r} cannot be imported ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{text}: {module_name} has no callable {attr!r}")
    made = factory()
    if isinstance(made, models.LoadedModel):
        return made
    if isinstance(made, tuple) and len(made) in (2, 3):
        module_, args, *rest = made
        kwargs = rest[0] if rest else {}
        if not isinstance(args, tuple):
            args = (args,)
        return module_, args, dict(kwargs or {})
    raise ModelLoadError(f"{text}: the factory must return (module, args), "
                         "(module, args, kwargs) or a rewriter.models.LoadedModel, got "
                         f"{type(made).__name__}")


def tokenizer_for_saved(path: Path, manifest: dict):
    """The tokenizer of a saved program: hf/ if it holds one, else the recorded source; None
    when neither is available (then commands that need text say so)."""
    import transformers

    hf = path / "hf"
    if (hf / "tokenizer_config.json").is_file() or (hf / "tokenizer.json").is_file():
        try:
            return transformers.AutoTokenizer.from_pretrained(hf)
        except Exception:  # fall back to the source
            pass
    origin = (manifest.get("before") or {}).get("model") or manifest.get("source")
    if not origin:
        return None
    return tokenizer_of(origin)


def tokenizer_of(origin: str):
    from rewriter import models

    try:
        if FACTORY.match(origin) and not os.path.exists(origin):
            made = call_factory(origin)
            return made.tokenizer if isinstance(made, models.LoadedModel) else None
        import transformers

        directory, gguf_file, _ = models.resolve(origin)
        with models._quiet_tqdm():
            return transformers.AutoTokenizer.from_pretrained(
                directory, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception:  # a moved or missing source: no tokenizer
        return None


def need_tokenizer(program: Program, what: str) -> Any:
    if program.tokenizer is None:
        raise RewriterError(f"{what} needs a tokenizer, and this program has none (a saved "
                            "program whose source model cannot be found, or a factory that "
                            "returns a bare module): pass a zoo name or model directory")
    return program.tokenizer


@dataclass
class ModelInputs:
    """A loaded model and the example inputs it is captured with."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    tokenizer: Any = None


def load_model(model: str, seq_len: int, batch: int = EXAMPLE_BATCH, *,
               trust_pickle: bool = False, dtype: str | None = None,
               revision: str | None = None) -> ModelInputs:
    """`rewriter.models.load` plus example inputs built from real text."""
    from rewriter import models

    loaded = models.load(model, dtype or "float32", trust_pickle=trust_pickle,
                         revision=revision)
    try:
        args, kwargs = loaded.example_inputs(seq_len, batch=batch)
    except ValueError as exc:  # the text is shorter than the inputs asked for
        raise typer.BadParameter(str(exc), param_hint="--seq-len") from exc
    return ModelInputs(loaded.name, loaded.model, args, kwargs, loaded.tokenizer)


def open_model(model: str, seq_len: int, reporter: Reporter, *, trust_pickle: bool = False,
               require_attention: bool = True, dtype: str | None = None,
               revision: str | None = None) -> Program:
    """The Program that MODEL names: loaded from a saved directory, or captured from a zoo
    name, HF directory, hub id, GGUF file or factory. ``dtype`` and ``revision`` apply to
    checkpoints (a saved program keeps the dtype it was captured in)."""
    import rewriter as rw
    from rewriter import models

    source = classify(model)
    if source.kind != "checkpoint" and (dtype or revision):
        raise RewriterError(f"--dtype and --revision apply to checkpoints and hub ids; {model} "
                            f"is a {'saved program' if source.kind == 'saved' else 'factory'}")
    if source.kind == "saved":
        with reporter.step(f"loading {model}"):
            # torch.export.load finds transformers' output classes (CausalLMOutputWithPast,
            # ...) in pytree's registry only once their module is imported.
            import transformers.modeling_outputs  # noqa: F401

            program = rw.load(model)
            program.tokenizer = tokenizer_for_saved(Path(model), program.manifest)
        return program
    if source.kind == "factory":
        with reporter.step(f"building {model}"):
            made = call_factory(model)
        if isinstance(made, models.LoadedModel):
            inputs = ModelInputs(made.name, made.model,
                                 *made.example_inputs(seq_len, EXAMPLE_BATCH), made.tokenizer)
        else:
            inputs = ModelInputs(model, *made)
    else:
        with reporter.step(f"loading {model}"):
            inputs = load_model(model, seq_len, trust_pickle=trust_pickle, dtype=dtype,
                                revision=revision)
    with reporter.step(f"capturing {inputs.name} (seq-len {seq_len})"):
        program = rw.capture(inputs.model, inputs.args, inputs.kwargs,
                             require_attention=require_attention)
    program.tokenizer = inputs.tokenizer
    program.manifest["source"] = source.reference
    return program
