"""``hf/`` checkpoints: a converted program written as the source architecture's own
transformers checkpoint, where that architecture's config can express the result."""

from __future__ import annotations

from pathlib import Path

import torch

from rewriter.errors import RewriterError
from rewriter.io.tensors import write_safetensors

# transformers model types whose attention config is (heads, kv heads, head_dim) and whose
# q/k/v/o projections are separate linears named like the graph's parameters.
HF_GQA_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite"}


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
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and len(sites) != layers:
        dropped = layers - len(sites)
        return False, (f"{dropped} attention layer{'s' if dropped != 1 else ''} dropped: no "
                       "transformers config field says so")
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


def _config(program):
    config = program.hf_config.__class__.from_dict(program.hf_config.to_dict())
    config.num_key_value_heads = program.sites[0].num_kv_heads
    return config


def hf_state(program) -> dict[str, torch.Tensor]:
    """The state names (in the architecture's order) and meta tensors of the transformers
    model that `write_hf` writes for ``program``; no memory is allocated."""
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(_config(program)).state_dict()


def write_hf(program, directory: Path, weights: dict[str, torch.Tensor],
             expected: dict[str, torch.Tensor]) -> set[str]:
    """Write ``directory`` as a transformers checkpoint of the program: config, tokenizer,
    and ``model.safetensors`` holding those of ``weights`` (name -> tensor, each tensor once)
    that the architecture takes (``expected``: `hf_state`), streamed. Returns the names
    written there."""
    config = _config(program)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [n for n in expected if n not in weights and n not in tied
               and "rotary_emb" not in n]
    if missing:
        raise RewriterError(f"cannot write hf/: parameters missing from the program: "
                            f"{missing[:3]}")
    wrong = [n for n in expected if n in weights and weights[n].shape != expected[n].shape]
    if wrong:
        raise RewriterError(f"cannot write hf/: {wrong[0]} is {tuple(weights[wrong[0]].shape)} "
                            f"in the program, {tuple(expected[wrong[0]].shape)} in the config")
    names = [n for n in weights if n in expected]
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    write_safetensors(directory / "model.safetensors", ((n, weights[n]) for n in names),
                      metadata={"format": "pt"})
    if program.tokenizer is not None:
        try:
            program.tokenizer.save_pretrained(directory)
        except Exception:  # a tokenizer that cannot be saved does not void the weights
            pass
    return set(names)
