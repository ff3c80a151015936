"""Saved programs: ``program.pt2`` (torch.export), ``manifest.json``, the example inputs, and
``hf/`` where the source architecture's config expresses the result, written atomically
(rewriter.io.atomic). `read_saved` gives back what `rewriter.load` builds a Program from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rewriter.analysis.accounting import program_accounting
from rewriter.errors import ModelLoadError, RewriterError, first_line
from rewriter.io.atomic import atomic_directory
from rewriter.io.hf import hf_expressible, write_hf
from rewriter.io.inputs import load_inputs, save_inputs
from rewriter.ir.export import dynamic_shapes_for, strip_runtime_asserts
from rewriter.ir.graph import canonical_nodes, fetch_attr, set_attr, tensor_aliases
from rewriter.ir.site import AttentionSite

FORMAT_VERSION = 1


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
        torch.export.save(ep, tmp / "program.pt2")
        manifest["inputs"] = save_inputs(program.example_args, program.example_kwargs,
                                         tmp / "inputs.safetensors")
        fits, reason = hf_expressible(program)
        if fits:
            try:
                write_hf(program, tmp / "hf")
            except RewriterError as exc:  # program.pt2 stands without it
                shutil.rmtree(tmp / "hf", ignore_errors=True)
                fits, reason = False, first_line(exc)
        manifest["hf"] = {"written": fits, "reason": reason}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    atomic_directory(path, force, fill)
    return manifest


def read_saved(path) -> dict:
    """What a directory written by `save_program` holds, as keyword arguments of a Program:
    module, sites, example_args, example_kwargs, manifest. The graph is read with
    torch.export.load (no pickle); the graph before canonicalization is not kept."""
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
            "manifest": {k: v for k, v in manifest.items() if k != "sites"}}


def retie(module: torch.nn.Module, groups: list[list[str]], path: Path) -> None:
    """Make each group of names one tensor again (the first's), as it was when saved."""
    for names in groups:
        first = fetch_attr(module, names[0])
        for name in names[1:]:
            if not torch.equal(fetch_attr(module, name), first):
                raise ModelLoadError(f"{path}: tied weights {names[0]} and {name} differ")
            set_attr(module, name, first)
