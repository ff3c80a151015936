"""A zoo of tiny random-weight models for testing the attention matcher.

Every entry builds a small fp32 model in eval mode (seeded, so weights are
deterministic) and knows how to make inputs for a given (batch, seq).  ``sites``
lists the attention calls the model makes, in forward execution order (which is
also graph order after ``torch.export``), as ``(num_heads, num_kv_heads, head_dim)``.

``ZOO`` holds the positive entries, ``NEGATIVES`` models that use softmax (or
nothing at all) but contain no attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Inputs = tuple[tuple, dict]
Site = tuple[int, int, int]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Inputs]
    sites: tuple[Site, ...]
    attention: bool = True
    notes: str = ""
    # Softmaxes that are not attention (MoE routers): they stay in the program, rejected.
    other_softmax: int = 0


SEED = 0
VOCAB = 100
E, H, HKV, D = 32, 4, 2, 8  # embed, heads, kv heads (GQA), head dim; E == H * D
LAYERS = 2
FFN = 64
MAX_POS = 64

MHA_SITE: Site = (H, H, D)
GQA_SITE: Site = (H, HKV, D)
MQA_SITE: Site = (H, 1, D)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    # Avoid the low ids used as pad/bos/eos in the configs below.
    return torch.randint(3, VOCAB, (batch, seq), generator=_gen(seed))


def _hidden(batch: int, seq: int) -> Inputs:
    return (torch.randn(batch, seq, E, generator=_gen()),), {}


def _eval(model: nn.Module) -> nn.Module:
    return model.float().eval()


# --------------------------------------------------------------------------- transformers


def _hf(model_cls_name: str, config_cls_name: str, impl: str, **cfg) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(SEED)
        config = getattr(transformers, config_cls_name)(attn_implementation=impl, **cfg)
        model = getattr(transformers, model_cls_name)(config)
        got = model.config._attn_implementation
        if got != impl:
            raise RuntimeError(f"{model_cls_name}: asked for {impl!r}, got {got!r}")
        return _eval(model)

    return build


def _decoder_inputs(batch: int, seq: int) -> Inputs:
    ids = _ids(batch, seq)
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def _encoder_inputs(batch: int, seq: int) -> Inputs:
    ids = _ids(batch, seq)
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


VIT_IMAGE, VIT_PATCH = 16, 8  # 4 patches + CLS = 5 tokens, whatever seq is asked for


def _vit_inputs(batch: int, seq: int) -> Inputs:
    del seq  # the architecture fixes the token count
    return (), {"pixel_values": torch.randn(batch, 3, VIT_IMAGE, VIT_IMAGE, generator=_gen())}


def _t5_dec_len(seq: int) -> int:
    return max(seq - 2, 1)  # differs from the encoder length so cross attention has Sq != Sk


def _t5_inputs(batch: int, seq: int) -> Inputs:
    ids = _ids(batch, seq)
    return (), {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": _ids(batch, _t5_dec_len(seq), seed=2),
        "use_cache": False,
    }


WHISPER_MELS, WHISPER_SRC = 8, 8  # input_features [B, 8, 16] -> 8 encoder positions (fixed)


def _whisper_inputs(batch: int, seq: int) -> Inputs:
    feats = torch.randn(batch, WHISPER_MELS, 2 * WHISPER_SRC, generator=_gen())
    return (), {
        "input_features": feats,
        "decoder_input_ids": _ids(batch, seq, seed=2),
        "use_cache": False,
    }


_TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# encoder-decoders: the zoo's bare models and seq2seq_model()'s generation heads share these
T5_CONFIG = dict(_TOKENS, d_model=E, d_kv=D, d_ff=FFN, num_layers=LAYERS,
                 num_decoder_layers=LAYERS, num_heads=H, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, decoder_start_token_id=0)
_ENC_DEC = dict(_TOKENS, d_model=E, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=FFN,
                decoder_ffn_dim=FFN)
BART_CONFIG = dict(_ENC_DEC, max_position_embeddings=MAX_POS, decoder_start_token_id=2)
WHISPER_CONFIG = dict(_ENC_DEC, num_mel_bins=WHISPER_MELS, max_source_positions=WHISPER_SRC,
                      max_target_positions=MAX_POS, decoder_start_token_id=1)
# (model class, config class, config, matrix scale: see seq2seq_model)
SEQ2SEQ = {"t5": ("T5ForConditionalGeneration", "T5Config", T5_CONFIG, 8.0),
           "bart": ("BartForConditionalGeneration", "BartConfig", BART_CONFIG, 8.0),
           "whisper": ("WhisperForConditionalGeneration", "WhisperConfig", WHISPER_CONFIG, 1.0)}


def seq2seq_model(arch: str, impl: str = "sdpa") -> nn.Module:
    """The zoo's T5 / BART / Whisper config with its generation head (untied from the
    embedding), for generation tests. Every matrix is scaled (per architecture): at the zoo's
    small init, greedy decoding of a random model repeats one token (with a tied head, the
    one it was fed); scaled, it wanders, so a wrong cache shows in the tokens. The generation
    config is plain greedy (no EOS, forced or suppressed tokens)."""
    model_cls, config_cls, cfg, scale = SEQ2SEQ[arch]
    model = _hf(model_cls, config_cls, impl, **cfg, tie_word_embeddings=False)()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    gen = model.generation_config
    gen.eos_token_id = gen.forced_eos_token_id = gen.forced_bos_token_id = None
    gen.suppress_tokens = gen.begin_suppress_tokens = None
    return model


def seq2seq_inputs(arch: str, batch: int = 2, seq: int = 7) -> dict:
    """Encoder inputs and decoder ids for capture (row 0 of a text encoder's mask has two
    pads at the end, as a tokenizer pads)."""
    _, kwargs = (_whisper_inputs if arch == "whisper" else _t5_inputs)(batch, seq)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"][0, -2:] = 0
    return kwargs
_DEC = dict(
    _TOKENS,
    hidden_size=E,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=H,
    max_position_embeddings=MAX_POS,
)


def _hf_entries(
    arch: str,
    model_cls: str,
    config_cls: str,
    sites: tuple[Site, ...],
    notes: str,
    impls: tuple[str, ...] = ("sdpa", "eager"),
    inputs: Callable[[int, int], Inputs] = _decoder_inputs,
    other_softmax: int = 0,
    **cfg,
) -> list[ZooEntry]:
    return [
        ZooEntry(
            f"{arch}-{impl}", _hf(model_cls, config_cls, impl, **cfg), inputs, sites, notes=notes,
            other_softmax=other_softmax,
        )
        for impl in impls
    ]


HF_ENTRIES: list[ZooEntry] = [
    *_hf_entries(
        "llama",
        "LlamaForCausalLM",
        "LlamaConfig",
        (GQA_SITE,) * LAYERS,
        "GQA 4/2, rotary",
        **_DEC,
        num_key_value_heads=HKV,
    ),
    *_hf_entries(
        "mistral",
        "MistralForCausalLM",
        "MistralConfig",
        (GQA_SITE,) * LAYERS,
        "GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        head_dim=D,
    ),
    *_hf_entries(
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        (GQA_SITE,) * LAYERS,
        "GQA 4/2, qkv bias",
        **_DEC,
        num_key_value_heads=HKV,
    ),
    # Gemma2 declares _supports_sdpa = False (sdpa cannot softcap): eager only.
    *_hf_entries(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        (GQA_SITE,) * LAYERS,
        "softcap (tanh) on logits, GQA 4/2, alternating sliding-window/global layers",
        impls=("eager",),
        **_DEC,
        num_key_value_heads=HKV,
        head_dim=D,
        query_pre_attn_scalar=D,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4,
    ),
    *_hf_entries(
        "phi3",
        "Phi3ForCausalLM",
        "Phi3Config",
        (GQA_SITE,) * LAYERS,
        "fused qkv_proj split by slicing, GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
    ),
    *_hf_entries(
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2Config",
        (MHA_SITE,) * LAYERS,
        "Conv1D fused c_attn + split",
        **_TOKENS,
        n_embd=E,
        n_layer=LAYERS,
        n_head=H,
        n_positions=MAX_POS,
    ),
    *_hf_entries(
        "gpt-neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        (MHA_SITE,) * LAYERS,
        "interleaved fused query_key_value (per-head q|k|v), partial rotary 0.5",
        **_DEC,
        rotary_pct=0.5,
    ),
    *_hf_entries(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        (MHA_SITE,) * LAYERS,
        "learned positions",
        **{**_TOKENS, "pad_token_id": 1},
        hidden_size=E,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        max_position_embeddings=MAX_POS,
        word_embed_proj_dim=E,
    ),
    *_hf_entries(
        "bert",
        "BertModel",
        "BertConfig",
        (MHA_SITE,) * LAYERS,
        "bidirectional encoder",
        inputs=_encoder_inputs,
        **_DEC,
        type_vocab_size=2,
    ),
    *_hf_entries(
        "vit",
        "ViTModel",
        "ViTConfig",
        (MHA_SITE,) * LAYERS,
        "image encoder; seq ignored (5 tokens fixed)",
        inputs=_vit_inputs,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        image_size=VIT_IMAGE,
        patch_size=VIT_PATCH,
        num_channels=3,
    ),
    *_hf_entries(
        "t5",
        "T5Model",
        "T5Config",
        (MHA_SITE,) * (3 * LAYERS),
        "enc self x2, then dec (self, cross) x2; unscaled, relative position bias "
        "(passed to sdpa as the mask); decoder len = seq - 2",
        inputs=_t5_inputs,
        **T5_CONFIG,
    ),
    *_hf_entries(
        "whisper",
        "WhisperModel",
        "WhisperConfig",
        (MHA_SITE,) * (3 * LAYERS),
        "enc self x2 (8 frames fixed), then dec (self, cross) x2; q pre-scaled, sdpa scale=1",
        inputs=_whisper_inputs,
        **WHISPER_CONFIG,
    ),
    # ---- more architectures (issue #16 item 5) ----
    *_hf_entries(
        "qwen3",
        "Qwen3ForCausalLM",
        "Qwen3Config",
        (GQA_SITE,) * LAYERS,
        "per-head q/k RMSNorm between projection and RoPE, GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        head_dim=D,
    ),
    *_hf_entries(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        (GQA_SITE,) * LAYERS,
        "q/k RMSNorm, query_pre_attn_scalar scale, sliding-window then global layer, GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        head_dim=D,
        query_pre_attn_scalar=D,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    *_hf_entries(
        "phi",
        "PhiForCausalLM",
        "PhiConfig",
        (MHA_SITE,) * LAYERS,
        "phi-2: partial rotary 0.5, dense output projection, parallel attention/MLP",
        **_DEC,
        partial_rotary_factor=0.5,
    ),
    *_hf_entries(
        "gptj",
        "GPTJForCausalLM",
        "GPTJConfig",
        (MHA_SITE,) * LAYERS,
        "interleaved (rotate-every-two) partial rotary on x[:, :, :, :4], explicit full slices",
        **_TOKENS,
        n_embd=E,
        n_layer=LAYERS,
        n_head=H,
        n_inner=FFN,
        rotary_dim=4,
        n_positions=MAX_POS,
    ),
    *_hf_entries(
        "codegen",
        "CodeGenForCausalLM",
        "CodeGenConfig",
        (MHA_SITE,) * LAYERS,
        "fused qkv_proj in 4 model-parallel blocks (q|v|k per block), interleaved partial rotary",
        **_TOKENS,
        n_embd=E,
        n_layer=LAYERS,
        n_head=H,
        n_inner=FFN,
        rotary_dim=4,
        n_positions=MAX_POS,
        n_ctx=MAX_POS,
    ),
    *_hf_entries(
        "falcon",
        "FalconForCausalLM",
        "FalconConfig",
        (GQA_SITE,) * LAYERS,
        "falcon-40b style (new_decoder_architecture): fused qkv grouped per KV head, K/V "
        "broadcast to the query heads *before* RoPE (head copies), GQA 4/2; eager divides the "
        "scores in place (div_)",
        **_TOKENS,
        hidden_size=E,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        num_kv_heads=HKV,
        new_decoder_architecture=True,
        alibi=False,
        max_position_embeddings=MAX_POS,
    ),
    *_hf_entries(
        "falcon-mqa",
        "FalconForCausalLM",
        "FalconConfig",
        (MQA_SITE,) * LAYERS,
        "falcon-7b style: multi-query (1 KV head, broadcast by the product, not repeated), "
        "fused qkv, rotary, parallel attention",
        **_TOKENS,
        hidden_size=E,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        alibi=False,
        max_position_embeddings=MAX_POS,
    ),
    *_hf_entries(
        "stablelm",
        "StableLmForCausalLM",
        "StableLmConfig",
        (GQA_SITE,) * LAYERS,
        "per-head q/k LayerNorm (one LayerNorm per head), qkv bias, partial rotary 0.25, GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        partial_rotary_factor=0.25,
        qk_layernorm=True,
        use_qkv_bias=True,
    ),
    *_hf_entries(
        "olmo2",
        "Olmo2ForCausalLM",
        "Olmo2Config",
        (GQA_SITE,) * LAYERS,
        "q/k RMSNorm over the whole projection (all heads together), GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
    ),
    *_hf_entries(
        "granite",
        "GraniteForCausalLM",
        "GraniteConfig",
        (GQA_SITE,) * LAYERS,
        "attention_multiplier 0.3 as the scale (not 1/sqrt(D)), GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        attention_multiplier=0.3,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        logits_scaling=4.0,
    ),
    *_hf_entries(
        "cohere",
        "CohereForCausalLM",
        "CohereConfig",
        (GQA_SITE,) * LAYERS,
        "interleaved rotary, q/k LayerNorm with per-head weights, parallel block, GQA 4/2",
        **_DEC,
        num_key_value_heads=HKV,
        use_qk_norm=True,
    ),
    *_hf_entries(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        (GQA_SITE,) * LAYERS,
        "sparse MoE MLP: a router softmax per layer that is not attention, GQA 4/2",
        other_softmax=LAYERS,
        **_DEC,
        num_key_value_heads=HKV,
        head_dim=D,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    *_hf_entries(
        "gpt-bigcode",
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        (MQA_SITE,) * LAYERS,
        "starcoder: multi-query, fused c_attn split [E, D, D]",
        **_TOKENS,
        n_embd=E,
        n_layer=LAYERS,
        n_head=H,
        n_inner=FFN,
        n_positions=MAX_POS,
        multi_query=True,
    ),
    *_hf_entries(
        "bart",
        "BartModel",
        "BartConfig",
        (MHA_SITE,) * (3 * LAYERS),
        "enc self x2, then dec (self, cross) x2, learned positions; decoder len = seq - 2",
        inputs=_t5_inputs,
        **BART_CONFIG,
    ),
    *_hf_entries(
        "distilbert",
        "DistilBertModel",
        "DistilBertConfig",
        (MHA_SITE,) * LAYERS,
        "encoder without token types, learned positions",
        inputs=_encoder_inputs,
        vocab_size=VOCAB,
        pad_token_id=0,
        dim=E,
        n_layers=LAYERS,
        n_heads=H,
        hidden_dim=FFN,
        max_position_embeddings=MAX_POS,
    ),
    *_hf_entries(
        "albert",
        "AlbertModel",
        "AlbertConfig",
        (MHA_SITE,) * LAYERS,
        "encoder; one layer's weights shared by both layers, factorized embedding (16 -> 32)",
        inputs=_encoder_inputs,
        **_TOKENS,
        embedding_size=16,
        hidden_size=E,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
    ),
    *_hf_entries(
        "clip-vision",
        "CLIPVisionModel",
        "CLIPVisionConfig",
        (MHA_SITE,) * LAYERS,
        "image encoder, pre-LayerNorm; seq ignored (5 tokens fixed)",
        inputs=_vit_inputs,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        image_size=VIT_IMAGE,
        patch_size=VIT_PATCH,
        num_channels=3,
    ),
    *_hf_entries(
        "siglip-vision",
        "SiglipVisionModel",
        "SiglipVisionConfig",
        (MHA_SITE,) * LAYERS,
        "image encoder without CLS (4 tokens fixed); the pooling head (nn.MultiheadAttention "
        "with a learned probe as query, always eager) is left out: vision_use_head=False",
        inputs=_vit_inputs,
        vision_use_head=False,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        image_size=VIT_IMAGE,
        patch_size=VIT_PATCH,
        num_channels=3,
    ),
]


# --------------------------------------------------------------------------- torch.nn


class MHA(nn.Module):
    """nn.MultiheadAttention self-attention that returns only the output."""

    def __init__(self, need_weights: bool, average_attn_weights: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.need_weights = need_weights
        self.average_attn_weights = average_attn_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(
            x, x, x, need_weights=self.need_weights, average_attn_weights=self.average_attn_weights
        )
        return out


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=FFN, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# --------------------------------------------------------------------------- hand-written


class HandAttention(nn.Module):
    """q/k/v/o projections around ``core``; q/k/v reach ``core`` as [B, S, heads, D]."""

    num_kv_heads = H

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(E, H * D)
        self.k_proj = nn.Linear(E, self.num_kv_heads * D)
        self.v_proj = nn.Linear(E, self.num_kv_heads * D)
        self.o_proj = nn.Linear(H * D, E)
        self.scale = D**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, H, D)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, D)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, D)
        out = self.core(q, k, v)  # [B, S, H, D]
        return self.o_proj(out.reshape(b, s, H * D))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _bhsd(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)


class Einsum(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v).transpose(1, 2)


class EinsumBSHD(HandAttention):
    def core(self, q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class Bmm(HandAttention):
    def core(self, q, k, v):
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2).reshape(b * H, s, D) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)) * self.scale
        probs = F.softmax(scores, dim=-1)
        out = torch.bmm(probs, v)
        return out.view(b, H, s, D).transpose(1, 2)


class Baddbmm(HandAttention):
    """Causal additive bias [1, S, S] folded in by baddbmm (broadcast over B*H)."""

    def core(self, q, k, v):
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2).reshape(b * H, s, D) for t in (q, k, v))
        bias = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
        bias = torch.triu(bias, diagonal=1)[None]
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.scale)
        probs = F.softmax(scores, dim=-1)
        return torch.bmm(probs, v).view(b, H, s, D).transpose(1, 2)


class PrescaledQ(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        q = q * D**-0.5
        probs = torch.matmul(q, k.transpose(-2, -1)).softmax(-1)
        return torch.matmul(probs, v).transpose(1, 2)


class DivScale(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        return (scores.softmax(-1) @ v).transpose(1, 2)


class MulScale(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        scores = (q @ k.transpose(-1, -2)) * D**-0.5
        return (scores.softmax(-1) @ v).transpose(1, 2)


class MaskedFill(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        s = q.shape[-2]
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)


class AdditiveMask(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        s = q.shape[-2]
        mask = torch.triu(torch.full((s, s), float("-inf"), device=q.device), diagonal=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale + mask
        return (scores.softmax(-1) @ v).transpose(1, 2)


class Fp32Softmax(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return (probs @ v).transpose(1, 2)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    b, hkv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


class RepeatKV(HandAttention):
    num_kv_heads = HKV

    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        k, v = _repeat_kv(k, H // HKV), _repeat_kv(v, H // HKV)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return (scores.softmax(-1) @ v).transpose(1, 2)


class RepeatInterleave(HandAttention):
    num_kv_heads = HKV

    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        k = torch.repeat_interleave(k, H // HKV, dim=1)
        v = torch.repeat_interleave(v, H // HKV, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return (scores.softmax(-1) @ v).transpose(1, 2)


class SdpaEnableGQA(HandAttention):
    num_kv_heads = HKV

    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)


class SdpaCausal(HandAttention):
    def core(self, q, k, v):
        q, k, v = _bhsd(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


# --------------------------------------------------------------------------- negatives


class MoERouter(nn.Module):
    """Softmax router with top-2 gating over 4 tiny experts (dense compute)."""

    def __init__(self, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(E, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(E, FFN), nn.GELU(), nn.Linear(FFN, E))
            for _ in range(num_experts)
        )
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1)  # [B, S, X]
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)
        outs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, S, X, E]
        return x + (outs * gates[..., None]).sum(-2)


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(E, FFN), nn.GELU(), nn.Linear(FFN, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.mlp(x.mean(dim=1)), dim=-1)


class AttentionPooling(nn.Module):
    """Pooling with a learned query: no query comes from the input, so not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, E))
        self.k_proj = nn.Linear(E, E)
        self.v_proj = nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(self.query @ k.transpose(-1, -2) / math.sqrt(E), dim=-1)  # [B,1,S]
        return (weights @ v).squeeze(1)


class NoSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(E, FFN), nn.ReLU(), nn.Linear(FFN, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# --------------------------------------------------------------------------- registry


def _seeded(cls: Callable[..., nn.Module], **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return _eval(cls(**kwargs))

    return build


def _local(name, cls, sites, notes="", **kwargs) -> ZooEntry:
    return ZooEntry(name, _seeded(cls, **kwargs), _hidden, sites, notes=notes)


TORCH_ENTRIES: list[ZooEntry] = [
    _local(
        "mha",
        MHA,
        (MHA_SITE,),
        "nn.MultiheadAttention, need_weights=False -> sdpa",
        need_weights=False,
    ),
    _local(
        "mha-weights",
        MHA,
        (MHA_SITE,),
        "nn.MultiheadAttention, need_weights=True -> bmm/softmax/bmm (weights discarded)",
        need_weights=True,
    ),
    _local(
        "mha-weights-per-head",
        MHA,
        (MHA_SITE,),
        "nn.MultiheadAttention, need_weights=True, average_attn_weights=False",
        need_weights=True,
        average_attn_weights=False,
    ),
    _local("transformer-encoder-layer", EncoderLayer, (MHA_SITE,), "nn.TransformerEncoderLayer"),
]

HAND_ENTRIES: list[ZooEntry] = [
    _local("einsum", Einsum, (MHA_SITE,), "einsum bhqd,bhkd->bhqk"),
    _local("einsum-bshd", EinsumBSHD, (MHA_SITE,), "einsum bqhd,bkhd->bhqk, q/k/v in [B,S,H,D]"),
    _local("bmm", Bmm, (MHA_SITE,), "[B*H,S,D] bmm"),
    _local("baddbmm", Baddbmm, (MHA_SITE,), "baddbmm(causal bias, q, k^T, alpha=scale)"),
    _local("prescaled-q", PrescaledQ, (MHA_SITE,), "q * D**-0.5 before matmul"),
    _local("div-scale", DivScale, (MHA_SITE,), "scores / sqrt(D)"),
    _local("mul-scale", MulScale, (MHA_SITE,), "scores * D**-0.5"),
    _local("masked-fill", MaskedFill, (MHA_SITE,), "causal masked_fill(~tril, -inf)"),
    _local("additive-mask", AdditiveMask, (MHA_SITE,), "causal + triu(-inf)"),
    _local("fp32-softmax", Fp32Softmax, (MHA_SITE,), "softmax(scores.float()).to(dtype)"),
    _local("repeat-kv", RepeatKV, (GQA_SITE,), "GQA via HF repeat_kv (expand+reshape)"),
    _local("repeat-interleave", RepeatInterleave, (GQA_SITE,), "GQA via repeat_interleave"),
    _local("sdpa-enable-gqa", SdpaEnableGQA, (GQA_SITE,), "F.sdpa(enable_gqa=True)"),
    _local("sdpa-causal", SdpaCausal, (MHA_SITE,), "F.sdpa(is_causal=True)"),
]

ZOO: list[ZooEntry] = HF_ENTRIES + TORCH_ENTRIES + HAND_ENTRIES


# --------------------------------------------------------------------------- ALiBi (issue #16)
# Position biases carried as the canonical op's ``alibi`` slopes (rewriter.patterns.alibi).


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes for a power-of-two head count: 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class BaddbmmAlibi(HandAttention):
    """The hand-written ALiBi core: baddbmm(slopes[h] * key_pos, q, k^T, beta=1, alpha=1/sqrt(D)),
    then a causal masked_fill."""

    def core(self, q, k, v):
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2).reshape(b * H, s, D) for t in (q, k, v))
        pos = torch.arange(s, device=q.device, dtype=torch.float32)
        alibi = (alibi_slopes(H).to(q.device)[:, None, None] * pos).repeat(b, 1, 1)  # [B*H, 1, S]
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(D))
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        return torch.bmm(probs, v).view(b, H, s, D).transpose(1, 2)


ALIBI_ENTRIES: list[ZooEntry] = [
    *_hf_entries("bloom", "BloomForCausalLM", "BloomConfig", (MHA_SITE,) * LAYERS,
                 "ALiBi via baddbmm(alibi, q, k^T) from the mask's cumsum; fused qkv",
                 impls=("eager",), **_TOKENS, hidden_size=E, n_layer=LAYERS, n_head=H),
    *_hf_entries("mpt", "MptForCausalLM", "MptConfig", (MHA_SITE,) * LAYERS,
                 "ALiBi position_bias [H, 1, max_len] sliced and added to the scores",
                 impls=("eager",), **_TOKENS, d_model=E, n_layers=LAYERS, n_heads=H,
                 max_seq_len=MAX_POS),
    *_hf_entries("falcon-alibi", "FalconForCausalLM", "FalconConfig", (MHA_SITE,) * LAYERS,
                 "alibi=True: ALiBi added to the scores (and again, masked, as the mask)",
                 impls=("eager",), **_DEC, alibi=True, new_decoder_architecture=False,
                 multi_query=False),
    _local("baddbmm-alibi", BaddbmmAlibi, (MHA_SITE,),
           "hand-written baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(D)) + causal fill"),
]
ZOO += ALIBI_ENTRIES


def _negative(name: str, cls, notes: str) -> ZooEntry:
    return ZooEntry(name, _seeded(cls), _hidden, (), attention=False, notes=notes)


NEGATIVES: list[ZooEntry] = [
    _negative("moe-router", MoERouter, "softmax over router logits, top-2 of 4 experts"),
    _negative("classifier", Classifier, "softmax over class logits"),
    _negative("attention-pooling", AttentionPooling, "learned query [1,1,E] pools the sequence"),
    _negative("no-softmax", NoSoftmax, "plain MLP"),
]

_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ZOO + NEGATIVES}
assert len(_BY_NAME) == len(ZOO) + len(NEGATIVES), "duplicate zoo names"


def get(name: str) -> ZooEntry:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo entry {name!r}; have {sorted(_BY_NAME)}") from None


def vit(grid: int, impl: str = "sdpa", layers: int = LAYERS) -> ZooEntry:
    """A ViT like the "vit" entries with a grid x grid patch grid (patch 8, image 8 * grid) plus
    CLS: for neighbourhood masks, which need a grid larger than the kernel. Not in ZOO."""
    image = VIT_PATCH * grid

    def inputs(batch: int, seq: int) -> Inputs:
        del seq
        return (), {"pixel_values": torch.randn(batch, 3, image, image, generator=_gen())}

    build = _hf("ViTModel", "ViTConfig", impl, hidden_size=E, intermediate_size=FFN,
                num_hidden_layers=layers, num_attention_heads=H, image_size=image,
                patch_size=VIT_PATCH, num_channels=3)
    return ZooEntry(f"vit{grid}x{grid}-{impl}", build, inputs, (MHA_SITE,) * layers,
                    notes=f"{grid}x{grid} patches + CLS")


# Decoders with their own sliding window (captured on token ids alone, the window is found:
# tests/test_native_windows.py): name -> (build, the sparsity each layer's site should carry).
SLIDING_WINDOW = 4  # the models' sliding window: shorter than the test sequences, so it shows
SLIDING: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "gemma2-eager": (get("gemma2-eager").build, [f"window={SLIDING_WINDOW}", ""]),
    **{f"mistral-{impl}": (_hf("MistralForCausalLM", "MistralConfig", impl, **_DEC,
                               num_key_value_heads=HKV, head_dim=D,
                               sliding_window=SLIDING_WINDOW),
                           [f"window={SLIDING_WINDOW}"] * LAYERS)
       for impl in ("sdpa", "eager")},
    # Qwen2 slides from layer max_window_layers on
    "qwen2-sdpa": (_hf("Qwen2ForCausalLM", "Qwen2Config", "sdpa", **_DEC,
                       num_key_value_heads=HKV, use_sliding_window=True,
                       sliding_window=SLIDING_WINDOW, max_window_layers=1),
                   ["", f"window={SLIDING_WINDOW}"]),
}
