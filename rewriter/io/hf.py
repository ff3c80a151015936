"""``hf/`` checkpoints: a converted program written as the source architecture's own
transformers checkpoint, where that architecture's config can express the result."""

from __future__ import annotations

from pathlib import Path

from rewriter.errors import RewriterError
from rewriter.io.quiet import quiet_tqdm

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
    with quiet_tqdm():
        model.save_pretrained(directory, safe_serialization=True)
    if program.tokenizer is not None:
        try:
            program.tokenizer.save_pretrained(directory)
        except Exception:  # a tokenizer that cannot be saved does not void the weights
            pass
