"""Model-native sliding windows (rewriter.patterns.native_window): Gemma2, Mistral and Qwen2 with
``sliding_window`` build a causal + window mask; proven, it becomes the canonical op's
``sparsity="window=W"`` and the decoders serve those models with a bounded cache.

Positive: the window is found per layer where the model applies it. Negative: a plain causal
mask, a dilated one and a mask that reads a padding mask stay as they were. Numeric: the program
equals the model at three shapes, and the decoder's greedy tokens equal ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewriter as rw
from rewriter.analysis.quality import logits_fn
from rewriter.errors import SpecError
from rewriter.ir.masks import MaskSpec

zoo = pytest.importorskip("zoo")

W = zoo.SLIDING_WINDOW
WINDOWED = zoo.SLIDING
SHAPES = [(2, 7), (3, 9), (2, 13)]
TOL = 1e-5


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            build, _ = WINDOWED[name]
            model = build()
            cache[name] = model, rw.capture(model, (zoo._ids(2, 9),), {"use_cache": False})
        return cache[name]
    return get


def logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        out = module(ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("name", WINDOWED)
def test_window_found_where_the_model_slides(captured, name):
    _, prog = captured(name)
    want = WINDOWED[name][1]
    assert [s.sparsity for s in prog.sites] == want
    for site, sparsity in zip(prog.sites, want, strict=True):
        if sparsity:
            assert site.mask == "causal" and site.is_causal
            assert any("own sliding window" in n for n in site.notes)
        else:
            assert site.mask != "causal" or not site.notes


@pytest.mark.parametrize("name", WINDOWED)
def test_program_equals_model(captured, name):
    model, prog = captured(name)
    run = logits_fn(prog)
    for b, s in SHAPES:
        ids = zoo._ids(b, s, seed=s)
        want = logits(model, ids)
        err = float((run(ids) - want).abs().max() / want.abs().max())
        assert err < TOL, (b, s, err)


@pytest.mark.parametrize("name", WINDOWED)
def test_decoder_equals_model_generate(captured, name):
    """Greedy tokens past the window, batch of 2: the decoder (bounded cache on the sliding
    layers) against the model's own generate with its own cache."""
    model, prog = captured(name)
    decoder = prog.decoder()
    bounds = {e.bound for e in decoder.cache if e.sites[0] in
              [s.index for s in prog.sites if s.sparsity]}
    assert bounds == {W - 1}  # the window's past: W - 1 cached positions
    prompt = zoo._ids(2, 6, seed=3)
    model.generation_config.eos_token_id = None  # every run makes all its tokens
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=3 * W, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(decoder.generate(prompt, 3 * W), want)


def test_variant_masks_combine_with_the_model_window(captured):
    """A sparse variant ANDs with the model's window: narrower windows win, sinks inside the
    model's window change nothing, a mask no single spec can say is refused in one line."""
    _, prog = captured("gemma2-eager")
    narrower = rw.rewrite(prog, "sparse:window=2")
    assert [s.sparsity for s in narrower.sites] == ["window=2", "window=2"]
    wide = rw.rewrite(prog, "sparse:window=6,sink=1")
    assert [s.sparsity for s in wide.sites] == [f"window={W}", "window=6,sink=1"]
    with pytest.raises(SpecError, match="site 0: sink=1 with a window shorter"):
        rw.rewrite(prog, "sparse:window=2,sink=1")
    # a later sparse variant replaces an earlier one's mask, never the model's window
    assert [s.model_window for s in prog.sites] == [W, None]
    again = rw.rewrite(narrower, "sparse:window=6,sink=1")
    assert [s.sparsity for s in again.sites] == [f"window={W}", "window=6,sink=1"]


def test_within_is_the_and_of_both_masks():
    """MaskSpec.within(W) keeps exactly the keys both masks keep (checked on a 12 x 12 grid,
    4 heads), or refuses."""
    q = torch.arange(12)[:, None]
    k = torch.arange(12)[None, :]
    causal = k <= q
    model = causal & (q - k < W)
    for text in ["", "window=2", "window=6,sink=1", "window=3,dilation=2",
                 "window=2,heads=ffss", "window=2,heads=f/3/s/9", "window=9,sink=2"]:
        spec = MaskSpec.parse(text)
        both = MaskSpec.parse(text).within(W)
        for h in range(4):
            def keep(m, h=h):
                windows = m.head_windows(4) if m.heads else None
                return m.mask_mod(0, h, q, k, windows=windows) & causal
            assert torch.equal(keep(both), keep(spec) & model), (text, h, both)
    for text in ["window=2,sink=1", "window=3,dilation=2,heads=fsss", "neighborhood=3,grid=3x4"]:
        with pytest.raises(SpecError):
            MaskSpec.parse(text).within(W)


# --- negatives ---------------------------------------------------------------------------


class MaskedCore(nn.Module):
    """One attention whose [S, S] mask is built from positions by ``keep(i, j)``."""

    def __init__(self, keep):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.keep = keep

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        scores = scores.masked_fill(~self.keep(i, j), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("keep, sparsity", [
    (lambda i, j: (j <= i) & (i - j < 3), "window=3"),  # positive control, hand-written
    (lambda i, j: j <= i, ""),  # plain causal: left as it is
    (lambda i, j: (j <= i) & ((i - j) % 2 == 0), ""),  # dilated: no window says it
    (lambda i, j: (j <= i) & (i - j < 3) | (j == 0), ""),  # window + sink: not a model window
])
def test_only_causal_windows_are_read(keep, sparsity):
    module = MaskedCore(keep).eval()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(0))
    prog = rw.capture(module, (x,))
    assert [s.sparsity for s in prog.sites] == [sparsity]
    with torch.no_grad():
        for s in (5, 9, 12):
            y = torch.randn(2, s, 16)
            assert torch.allclose(prog.module(y), module(y), atol=1e-6)


def test_a_mask_reading_the_padding_mask_stays_opaque():
    """Captured with an attention_mask input, the mask reads its values: no proof, no window
    (the program stays exact with the model's mask)."""
    build, _ = WINDOWED["mistral-sdpa"]
    model = build()
    args, kwargs = zoo._decoder_inputs(2, 9)
    prog = rw.capture(model, args, kwargs)
    assert all(not s.sparsity for s in prog.sites)
