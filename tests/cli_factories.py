"""Tiny models for the CLI tests, named on the command line as ``cli_factories:NAME``
(``tests/`` is on sys.path under pytest; subprocess runs set PYTHONPATH)."""

from __future__ import annotations

import torch
from torch import nn

from rewriter.models import ZOO, LoadedModel, zoo_path

HEADS, KV_HEADS = 4, 2


def minilm_tokenizer():
    """A real tokenizer that loads in well under a second (MiniLM's WordPiece)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(zoo_path(ZOO["minilm-l6"]))


def tiny_llama_model(vocab_size: int = 30522) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        attn_implementation="sdpa", architectures=["LlamaForCausalLM"])
    return transformers.LlamaForCausalLM(config).float().eval()


def tiny_llama() -> LoadedModel:
    """A 2-layer Llama (4 heads, 2 KV heads) with MiniLM's tokenizer: perplexity works."""
    return LoadedModel("tiny-llama", tiny_llama_model(), minilm_tokenizer(), causal=True)


def tiny_llama_bare():
    """The same model as (module, args, kwargs): no tokenizer."""
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    return tiny_llama_model(), (ids,), {"use_cache": False}


class SoftmaxMLP(nn.Module):
    """A classifier head: a softmax that is not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(-1)


def no_attention():
    torch.manual_seed(0)
    return SoftmaxMLP().eval(), (torch.randn(2, 16, 8),)


def not_a_model():
    return 42
