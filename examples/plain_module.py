"""The Python API on a hand-written ``nn.Module`` (no Hugging Face): capture a tiny transformer
whose blocks use plain q/k/v/o linears and SDPA, print its attention sites, rewrite it to GQA
with a sparse window, measure the error and run the result.

    .venv/bin/python examples/plain_module.py [--core sdpa|matmul] [--kv-heads 2] [--window 16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rewriter as rw


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, core: str) -> None:
        super().__init__()
        self.heads, self.head_dim, self.core = heads, dim // heads, core
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        if self.core == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # written out: scores, causal mask, softmax, weighted sum
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 8, layers: int = 2, core: str = "sdpa"):
        super().__init__()
        self.layers = nn.ModuleList(Attention(dim, heads, core) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.layers, self.norms, strict=True):
            x = x + attn(norm(x))
        return x


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--core", choices=["sdpa", "matmul"], default="sdpa",
                        help="attention as an SDPA call or as matmul + softmax")
    a = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyTransformer(heads=a.heads, core=a.core).eval()
    x = torch.randn(2, 32, 64)                   # [batch, tokens, features]
    prog = rw.capture(model, args=(x,))          # torch.export + find + canonicalize
    print(prog.summary(), end="")
    identity = prog.verify(float64=True)         # canonical graph vs the captured one
    print("identity check:", identity)

    specs = [f"gqa:kv-heads={a.kv_heads},merge=mean", f"sparse:window={a.window},sink=1"]
    new = rw.rewrite(prog, specs)                # a new Program; prog is unchanged
    print(new.summary(), end="")
    report = new.verify(prog)                    # the variant's error vs the dense program
    print(f"{' + '.join(specs)}: max relative error {report.max_rel:.3g} vs the original")

    longer = torch.randn(1, 64, 64)              # dynamic shapes: other batch and length
    out = new.module(longer)
    print(f"ran on {tuple(longer.shape)} -> {tuple(out.shape)}")
    return {"identity_error": identity.max_rel, "variant_error": report.max_rel,
            "kv_heads": [s.num_kv_heads for s in new.sites],
            "parameters": [prog.parameter_count(), new.parameter_count()],
            "output_shape": tuple(out.shape)}


if __name__ == "__main__":
    main()
