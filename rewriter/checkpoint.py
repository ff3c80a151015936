"""Saving and loading Programs: ``program.pt2`` (torch.export), ``manifest.json`` and, where
the result fits the source architecture's own config, an ``hf/`` transformers checkpoint.

Every write goes to a temporary directory beside the target and is renamed into place at the
end, so a failure leaves nothing half written and an existing output is never touched unless
``force`` (and even then only replaced once the new one is complete)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import rewriter.ops  # noqa: F401  (the op must be registered to save or load the graph)
from rewriter.errors import ModelLoadError, RewriterError, first_line
from rewriter.frontend import dynamic_shapes_for, strip_runtime_asserts
from rewriter.models import _quiet_tqdm
from rewriter.patterns.graph import fetch_attr, set_attr, tensor_aliases

FORMAT_VERSION = 1
# transformers model types whose attention config is (heads, kv heads, head_dim) and whose
# q/k/v/o projections are separate linears named like the graph's parameters.
HF_GQA_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite"}


class OutputExistsError(RewriterError):
    exit_code = 5


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise OutputExistsError(f"{path} exists and is not empty: pick another --out or pass "
                                "--force to replace it")


def atomic_directory(path: Path, force: bool, fill) -> None:
    """Create ``path`` by filling a temporary sibling directory and renaming it."""
    path = Path(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
    try:
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_of(program, verification=None) -> dict:
    acc = program.accounting()
    return {
        "format": FORMAT_VERSION,
        "source": program.manifest.get("source"),
        "passes": program.manifest.get("passes", []),
        "parameters": program.parameter_count(),
        "kv_cache_bytes_per_token": acc["kv_cache_bytes_per_token"],
        "attention_density_at_1024": acc["attention_density"],
        "sites": [s.to_dict(full=True) for s in program.sites],
        # every name of each tied tensor: torch.export stores it once, loads it as copies
        "tied": [names for names in tensor_aliases(program.module).values() if len(names) > 1],
        "verification": None if verification is None else verification.to_dict(),
        "torch": torch.__version__,
        **{k: v for k, v in program.manifest.items()
           if k in ("quality", "onnx", "compile", "timings", "before")},
    }


def save_program(program, path, *, force: bool = False, verification=None) -> dict:
    path = Path(path)
    manifest = manifest_of(program, verification)

    def fill(tmp: Path) -> None:
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


def hf_expressible(program) -> tuple[bool, str]:
    """Whether the program is the source architecture with different uniform head counts."""
    config = program.hf_config
    if config is None:
        return False, "not captured from a transformers model"
    if config.model_type not in HF_GQA_FAMILIES:
        return False, f"{config.model_type} is not a family whose config expresses GQA here"
    sites = program.sites
    if any(s.sparsity or s.kv_source is not None or s.attn_source is not None for s in sites):
        return False, "sparse masks or cross-layer sharing have no transformers config field"
    heads = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites}
    if len(heads) != 1:
        return False, f"per-layer head counts differ ({sorted(heads)[:3]}...): saved as .pt2 only"
    (h, kv, d), = heads
    if h != config.num_attention_heads:
        return False, "query heads changed (pruned): the config has one head count for all"
    named = {n for n, _ in program.module.named_parameters()}
    for s in sites:
        for p in (s.q_proj, s.k_proj, s.v_proj, s.o_proj):
            if p is None or p.weight not in named or not p.weight.endswith("_proj.weight"):
                return False, "projections are not the architecture's own separate linears"
    return True, f"num_key_value_heads={kv}"


def write_hf(program, directory: Path) -> None:
    import transformers

    config = program.hf_config.__class__.from_dict(program.hf_config.to_dict())
    config.num_key_value_heads = program.sites[0].num_kv_heads
    model = transformers.AutoModelForCausalLM.from_config(config)
    state = program.module.state_dict()  # every name of a tied weight (named_parameters
    # would list it once)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m and not
               (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing:
        raise RewriterError(f"cannot write hf/: parameters missing from the program: "
                            f"{missing[:3]}")
    with _quiet_tqdm():
        model.save_pretrained(directory, safe_serialization=True)
    if program.tokenizer is not None:
        try:
            program.tokenizer.save_pretrained(directory)
        except Exception:  # a tokenizer that cannot be saved does not void the weights
            pass


def load_program(path):
    """A Program from a directory written by `save`. Loads the graph with torch.export.load
    (no pickle); the graph before canonicalization is not kept."""
    from rewriter.program import Program
    from rewriter.site import AttentionSite

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
    canonical = [n for n in module.graph.nodes if n.op == "call_function"
                 and n.target is torch.ops.rewriter.attention.default]
    if len(canonical) != len(sites):
        raise ModelLoadError(f"{path}: manifest lists {len(sites)} sites, graph has "
                             f"{len(canonical)}")
    for site, node in zip(sites, canonical, strict=True):
        site.node = node.name
    args, kwargs = load_inputs(manifest["inputs"], path / "inputs.safetensors")
    return Program(module=module, original=None, sites=sites, example_args=args,
                   example_kwargs=kwargs,
                   manifest={k: v for k, v in manifest.items() if k != "sites"})


def retie(module: torch.nn.Module, groups: list[list[str]], path: Path) -> None:
    """Make each group of names one tensor again (the first's), as it was when saved."""
    for names in groups:
        first = fetch_attr(module, names[0])
        for name in names[1:]:
            if not torch.equal(fetch_attr(module, name), first):
                raise ModelLoadError(f"{path}: tied weights {names[0]} and {name} differ")
            set_attr(module, name, first)


def save_inputs(args: tuple, kwargs: dict, tensors_path: Path) -> dict:
    """Example inputs as safetensors + a JSON description (no pickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def describe(name: str, value):
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous()
            return {"tensor": name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise RewriterError(f"cannot save example input {name} of type {type(value).__name__}")

    spec = {"args": [describe(f"arg{i}", a) for i, a in enumerate(args)],
            "kwargs": {k: describe(f"kw.{k}", v) for k, v in kwargs.items()}}
    save_file(tensors, str(tensors_path))
    return spec


def load_inputs(spec: dict, tensors_path: Path) -> tuple[tuple, dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(tensors_path)) if tensors_path.exists() else {}

    def value(d: dict):
        return tensors[d["tensor"]] if "tensor" in d else d["value"]

    return tuple(value(a) for a in spec["args"]), {k: value(v) for k, v in spec["kwargs"].items()}
