"""Saved programs: ``program.pt2`` (torch.export), ``manifest.json``, the example inputs, and
``hf/`` where the source architecture's config expresses the result, written atomically
(rewriter.io.atomic). `read_saved` gives back what `rewriter.load` builds a Program from.

Each tensor is stored once, streamed tensor by tensor (rewriter.io.tensors): in
``hf/model.safetensors`` when hf/ is written (the tensors its architecture takes, under its
names), the rest in ``weights.safetensors``. ``program.pt2`` holds the graph with placeholder
weights (stride-0 views of one scalar each: torch.export.save copies each storage into memory
before writing it), and loading puts the stored tensors back by name. Format 1 directories
(weights inside program.pt2) still load."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from rewriter.analysis.accounting import program_accounting
from rewriter.errors import ModelLoadError, RewriterError, first_line
from rewriter.io.atomic import atomic_directory
from rewriter.io.hf import hf_expressible, hf_state, write_hf
from rewriter.io.inputs import load_inputs, save_inputs
from rewriter.io.tensors import read_safetensors, write_safetensors
from rewriter.ir.export import dynamic_shapes_for, strip_runtime_asserts
from rewriter.ir.graph import canonical_nodes, fetch_attr, set_attr, tensor_aliases
from rewriter.ir.site import AttentionSite

FORMAT_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
HF_WEIGHTS_FILE = "hf/model.safetensors"
CONSTANT = "constant:"  # file-name prefix of ep.constants (lifted tensors), apart from state


def manifest_of(program, verification=None) -> dict:
    acc = program_accounting(program.sites)
    return {
        "format": FORMAT_VERSION,
        "source": program.manifest.get("source"),
        "passes": program.manifest.get("passes", []),
        "parameters": program.parameter_count(),
        "kv_cache_bytes_per_token": acc["kv_cache_bytes_per_token"],
        # a decoder's cache after 1024 tokens, sink + window KV heads bounded (rewriter.decoder)
        "kv_cache_bytes_at_1024": acc["kv_cache_bytes_at_ctx"],
        "kv_cache_bound_tokens": _largest_bound(acc),
        "attention_density_at_1024": acc["attention_density"],
        "sites": [s.to_dict(full=True) for s in program.sites],
        # every name of each tied tensor: torch.export stores it once, loads it as copies
        "tied": [names for names in tensor_aliases(program.module).values() if len(names) > 1],
        "verification": None if verification is None else verification.to_dict(),
        "torch": torch.__version__,
        **{k: v for k, v in program.manifest.items()
           if k in ("quality", "onnx", "compile", "timings", "before")},
    }


def _largest_bound(acc: dict) -> int | None:
    bounds = [b for row in acc["sites"] for b in row["kv_bound"] if b is not None]
    return max(bounds, default=None)


def save_program(program, path, *, force: bool = False, verification=None,
                 onnx: str | None = None) -> dict:
    """Write the directory ``path`` (see the module docstring); ``onnx``: also ``model.onnx``
    for that target (rewriter.codegen.onnx), in the same atomic write. Returns the manifest."""
    path = Path(path)
    manifest = manifest_of(program, verification)

    def fill(tmp: Path) -> None:
        if onnx is not None:
            from rewriter.codegen.onnx.export import export_program  # imports onnx: on demand

            rows = export_program(program, tmp / "model.onnx", onnx)
            manifest["onnx"] = {"target": onnx, "path": "model.onnx", "sites": rows}
        shapes = dynamic_shapes_for(program.module, program.example_args,
                                    program.example_kwargs)
        with torch.no_grad():
            ep = torch.export.export(program.module, program.example_args,
                                     kwargs=program.example_kwargs, strict=False,
                                     dynamic_shapes=shapes)
        fits, reason = hf_expressible(program)
        expected = hf_state(program) if fits else {}
        # tied tensors are stored under the name transformers expects, where hf/ is written
        weights, aliases = stored_tensors(ep, [*expected, *program.module.state_dict()])
        in_hf: set[str] = set()
        if fits:
            try:
                in_hf = write_hf(program, tmp / "hf", weights, expected)
            except RewriterError as exc:  # program.pt2 and weights.safetensors stand without
                shutil.rmtree(tmp / "hf", ignore_errors=True)
                fits, reason = False, first_line(exc)
        manifest["hf"] = {"written": fits, "reason": reason}
        rest = [(name, t) for name, t in weights.items() if name not in in_hf]
        files = [HF_WEIGHTS_FILE] if in_hf else []
        if rest or not in_hf:
            write_safetensors(tmp / WEIGHTS_FILE, rest)
            files.append(WEIGHTS_FILE)
        manifest["weights"] = {"files": files, "aliases": aliases,
                               "bytes": sum(t.numel() * t.element_size()
                                            for t in weights.values())}
        with placeholders(ep), warnings.catch_warnings():
            # a stride-0 placeholder never covers its storage group: "No complete tensor"
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(ep, tmp / "program.pt2")
        manifest["inputs"] = save_inputs(program.example_args, program.example_kwargs,
                                         tmp / "inputs.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    atomic_directory(path, force, fill)
    return manifest


def stored_tensors(ep, order: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors an ExportedProgram holds, each once: ({file name: tensor}, {alias: file
    name}) where names sharing one tensor (tied weights) store it under the one that comes
    first in ``order`` (names missing from it last)."""
    rank: dict[str, int] = {}
    for name in order:
        rank.setdefault(name, len(rank))
    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in sorted(_ep_tensors(ep), key=lambda item: rank.get(item[0], len(rank))):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
        else:
            seen[key] = name
            weights[name] = tensor.detach()
    return weights, aliases


def _ep_tensors(ep):
    """(file name, tensor) for ep.state_dict, then ep.constants that are tensors."""
    yield from ep.state_dict.items()
    yield from ((CONSTANT + n, t) for n, t in ep.constants.items()
                if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def placeholders(ep):
    """ep's tensors swapped for stride-0 views of a scalar each (same shapes, types and
    requires_grad), restored on exit: torch.export.save then writes one element per tensor.
    (One scalar shared by all would be one storage group, which torch.export.save warns
    about.)"""

    def stand_in(t: torch.Tensor) -> torch.Tensor:
        view = torch.zeros((), dtype=t.dtype).expand(t.shape)
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=t.requires_grad)
        return view

    state, constants = dict(ep.state_dict), dict(ep.constants)
    try:
        for name, t in state.items():
            ep.state_dict[name] = stand_in(t)
        for name, t in constants.items():
            if isinstance(t, torch.Tensor):
                ep.constants[name] = stand_in(t)
        yield
    finally:
        ep.state_dict.update(state)
        ep.constants.update(constants)


def restore_weights(ep, path: Path, weights: dict) -> None:
    """Put the tensors of a format-2 directory back into the loaded ep (placeholders in it),
    checking each name, shape and dtype."""
    files = [path / f for f in weights["files"]]
    stored: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{path}: {file.relative_to(path)} is missing")
        stored.update(read_safetensors(file))
    aliases = weights.get("aliases", {})
    made: dict[str, torch.Tensor] = {}  # file name -> the tensor every alias of it shares
    for table, prefix in ((ep.state_dict, ""), (ep.constants, CONSTANT)):
        for name, old in list(table.items()):
            if not isinstance(old, torch.Tensor):
                continue
            key = aliases.get(prefix + name, prefix + name)
            if key not in made:
                if key not in stored:
                    raise ModelLoadError(f"{path}: the weights files lack {key}")
                new = stored[key]
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise ModelLoadError(f"{path}: {key} is {new.dtype} {tuple(new.shape)} on "
                                         f"disk, the graph expects {old.dtype} "
                                         f"{tuple(old.shape)}")
                if isinstance(old, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                made[key] = new
            table[name] = made[key]


def read_saved(path) -> dict:
    """What a directory written by `save_program` holds, as keyword arguments of a Program:
    module, sites, example_args, example_kwargs, manifest. The graph is read with
    torch.export.load and the weights from safetensors (no pickle); the graph before
    canonicalization is not kept."""
    path = Path(path)
    pt2, manifest_path = path / "program.pt2", path / "manifest.json"
    if not pt2.is_file() or not manifest_path.is_file():
        raise ModelLoadError(f"{path}: not a saved program (needs program.pt2 and "
                             "manifest.json)")
    try:  # output containers (CausalLMOutputWithPast, ...) must be registered with pytree
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        pass
    try:
        manifest = json.loads(manifest_path.read_text())
        ep = torch.export.load(pt2)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the saved program: {first_line(exc)}") \
            from exc
    if manifest.get("weights"):
        try:
            restore_weights(ep, path, manifest["weights"])
        except (OSError, ValueError, SafetensorError) as exc:  # a damaged or truncated file
            raise ModelLoadError(f"{path}: cannot read the weights: {first_line(exc)}") \
                from exc
    module = ep.module()
    strip_runtime_asserts(module)
    retie(module, manifest.get("tied", []), path)
    sites = [AttentionSite.from_dict(d) for d in manifest["sites"]]
    canonical = list(canonical_nodes(module).values())
    if len(canonical) != len(sites):
        raise ModelLoadError(f"{path}: manifest lists {len(sites)} sites, graph has "
                             f"{len(canonical)}")
    for site, node in zip(sites, canonical, strict=True):
        site.node = node.name
    args, kwargs = load_inputs(manifest["inputs"], path / "inputs.safetensors")
    return {"module": module, "sites": sites, "example_args": args, "example_kwargs": kwargs,
            "manifest": {k: v for k, v in manifest.items() if k not in ("sites", "weights")}}


def retie(module: torch.nn.Module, groups: list[list[str]], path: Path) -> None:
    """Make each group of names one tensor again (the first's), as it was when saved."""
    for names in groups:
        first = fetch_attr(module, names[0])
        for name in names[1:]:
            if not torch.equal(fetch_attr(module, name), first):
                raise ModelLoadError(f"{path}: tied weights {names[0]} and {name} differ")
            set_attr(module, name, first)
