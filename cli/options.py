"""Argument and option types shared by the commands, and the checks of their values that
typer cannot do itself.

Choices that come from a registry (backends, ONNX targets) have a static metavar here so that
``--help`` does not import torch; `backend_names` and `onnx_targets` read the registries when a
command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rewriter.cli.errors import one_line
from rewriter.errors import ModelLoadError, SpecError

DEFAULT_SEQ_LEN = 16
BACKEND_METAVAR = "eager|triton|ort"  # rewriter.codegen.BACKENDS (tests check they agree)
ONNX_TARGET_METAVAR = "onnx|ort"  # rewriter.codegen.onnx.export.TARGETS

MODEL_HELP = ("A zoo name (smollm2-135m, minilm-l6), a Hugging Face model directory, a hub id "
              "(org/name, from the local Hugging Face cache), a .gguf file, a directory "
              "written by `rewriter convert`, or pkg.module:factory (a callable returning "
              "(module, args[, kwargs]) or a rewriter.models.LoadedModel).")
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)]
SeqLenOpt = Annotated[
    int,
    typer.Option("--seq-len", min=1, metavar="N",
                 help="Sequence length of the example inputs used for capture."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables."),
]
ExplainOpt = Annotated[
    bool,
    typer.Option("--explain",
                 help="Also list every softmax/SDPA that was not recognized as attention, "
                 "with its module path and the reason."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle",
                 help="Accept pickle weights (.bin/.pt); they are read with "
                 "torch.load(weights_only=True)."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", metavar="float32|bfloat16|float16", show_default=False,
                 help="Load a checkpoint in this dtype (default float32); rewrites keep it, "
                 "calibration accumulates in float32."),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", metavar="REV", show_default=False,
                 help="Branch, tag or commit of a hub id MODEL (org/name), read from the local "
                 "Hugging Face cache."),
]
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="DIR", show_default=False,
                       help="Output directory (must not exist or be empty, unless --force)."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing --out (only once the new one is "
                       "complete)."),
]
VariantOpt = Annotated[
    list[str],
    typer.Option("--variant", "-v", metavar="SPEC", show_default=False,
                 help="A variant spec, e.g. gqa:kv-heads=1 or sparse:window=256,sink=4; "
                 "repeat to apply several in order. Run `rewriter variants` for the list."),
]
CtxOpt = Annotated[int, typer.Option("--ctx", min=2, metavar="N",
                                     help="Tokens per evaluation window.")]
WindowsOpt = Annotated[int, typer.Option("--windows", min=1, metavar="N",
                                         help="Number of evaluation windows.")]
OnnxTargetOpt = Annotated[
    str | None,
    typer.Option("--onnx", metavar=ONNX_TARGET_METAVAR, show_default=False,
                 help="Also write model.onnx: onnx = standard ops (opset 23), ort = ONNX "
                 "Runtime contrib ops where they express a site."),
]
BackendOpt = Annotated[
    str, typer.Option("--backend", metavar=BACKEND_METAVAR,
                      help="What runs the program: eager PyTorch, generated Triton kernels "
                      "(needs a GPU), or ONNX Runtime (exported to a temporary file).")]


def _in_metavar_order(names, metavar: str) -> tuple[str, ...]:
    """Registry names, in the order the help text lists them (unlisted ones last), so error
    messages read like the help."""
    listed = metavar.split("|")
    return tuple(sorted(names, key=lambda n: listed.index(n) if n in listed else len(listed)))


def backend_names() -> tuple[str, ...]:
    """The registered backends (`rewriter.codegen.BACKENDS`; imports torch)."""
    from rewriter.codegen import BACKENDS

    return _in_metavar_order(BACKENDS, BACKEND_METAVAR)


def onnx_targets() -> tuple[str, ...]:
    """The ONNX export targets (`rewriter.codegen.onnx.export.TARGETS`; imports torch, onnx)."""
    from rewriter.codegen.onnx.export import TARGETS

    return _in_metavar_order(TARGETS, ONNX_TARGET_METAVAR)


def check_choice(value: str | None, allowed: tuple[str, ...], option: str) -> None:
    """A SpecError naming the allowed values when ``value`` (if given) is not one of them."""
    if value is not None and value not in allowed:
        raise SpecError(f"{option} {value!r}: allowed values are {', '.join(allowed)}")


def read_text(path: Path | None, option: str) -> str | None:
    """The UTF-8 text of an option's file (None when not given); a ModelLoadError naming the
    option when it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{option} {path}: not a readable UTF-8 text file "
                             f"({one_line(exc)})") from None
