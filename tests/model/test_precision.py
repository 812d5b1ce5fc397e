"""float16 and bfloat16 give finite images that match float32, with the committed tiny model on CPU.

CPU float16 reproduces the CUDA overflows this guards against: the head's posterior at t=999 (coefficient
~2e4) and the decoder's LayerNorm2d variance (|x - mean| ~900) both overflowed float16 before they ran in
float32, and a handful of NaN residuals then spread to every pixel through the decoder's linear attention.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dcar.model.autoencoder import LayerNorm2d
from dcar.model.config import pipeline_preset
from dcar.model.pipeline import Pipeline
from dcar.training.shapes_eval import EVAL_PROMPTS
from dcar.weights import embedded_weights

# 16 prompts spread over the six ShapesEval categories, two seeds each
PROMPTS = [spec.prompt for spec in EVAL_PROMPTS[::3][:16]]
SEEDS = (0, 3)
SIZE = 128  # 4x4 tokens: a quarter of the native cost (CPU half precision is slow); it overflowed as well
TOLERANCE = {"float16": 0.02, "bfloat16": 0.05}  # mean |image - float32 image|, [0, 1] units


def _pipe(dtype: str) -> Pipeline:
    return Pipeline.from_pretrained(embedded_weights(), dtype=dtype)


def _rows(pipe: Pipeline):
    return [pipe.params(p, seed=s, height=SIZE, width=SIZE) for p in PROMPTS for s in SEEDS]


def _assert_finite(results, codebook: int) -> None:
    for r in results:
        assert r.finite, f"row seed {r.seed}: flagged non-finite"
        assert torch.isfinite(r.image).all() and torch.isfinite(r.residual).all()
        assert int(r.tokens.min()) >= 0 and int(r.tokens.max()) < codebook


@pytest.fixture(scope="module")
def reference():
    pipe = _pipe("float32")
    results = pipe.generate(_rows(pipe))
    _assert_finite(results, pipe.config.generator.codebook_size)
    return torch.stack([r.image for r in results])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_float32(dtype, reference):
    pipe = _pipe(dtype)
    assert pipe.info()["dtype"] == dtype
    results = pipe.generate(_rows(pipe))
    assert len(results) == 2 * len(PROMPTS) == 32
    _assert_finite(results, pipe.config.generator.codebook_size)
    images = torch.stack([r.image for r in results])
    diff = (images - reference).abs().mean().item()
    assert diff <= TOLERANCE[dtype], f"{dtype}: mean |image - float32 image| = {diff:.4f}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_edit_and_previews_are_finite(dtype, reference):
    pipe = _pipe(dtype)
    source = reference[0] * 2 - 1  # a generated image, [-1, 1]
    mask = torch.zeros(1, *source.shape[-2:])
    mask[..., : source.shape[-1] // 2] = 1  # regenerate the left half
    edit = pipe.prepare_edit(source, mask)
    assert torch.isfinite(edit.residual).all()
    previews = []

    def preview_every_row(events, state):
        previews.extend(pipe.sampler.preview(state, i) for i in range(len(state)))

    params = [
        pipe.params("a blue circle", seed=1, height=SIZE, width=SIZE),
        pipe.params("a red square", seed=2, height=SIZE, width=SIZE),
    ]
    results = pipe.generate(params, [edit, edit], callback=preview_every_row)
    _assert_finite(results, pipe.config.generator.codebook_size)
    assert len(previews) == 2 * params[0].steps
    assert all(torch.isfinite(p).all() for p in previews)
    keep = source.shape[-1] // 2
    assert torch.allclose(results[0].image[..., keep:], reference[0][..., keep:], atol=1e-5)  # blended back


def test_full_size_modules_run_in_float16_without_overflow():
    """The official sizes (DC-HT, the 671M generator, T5-base) with random weights and a non-zero head.

    Random init zeroes the head's output layers and the generator's classifier (their outputs would be
    trivially finite), so those are drawn from N(0, 0.02) here.
    """
    full = pipeline_preset("dc-ar-512")
    # T5-base's sentencepiece vocabulary comes only with downloaded weights: T5-base sizes, byte-level vocabulary.
    config = replace(full, text_encoder=replace(full.text_encoder, tokenizer="byt5", vocab_size=384))
    pipe = Pipeline.from_config(config, dtype="float16", seed=0, name="full-random")
    g = torch.Generator().manual_seed(0)
    head = pipe.generator.diffloss.net
    zeroed = [
        pipe.generator.final_layer.linear,
        head.final_layer.linear,
        head.final_layer.adaLN_modulation[-1],
        *(b.adaLN_modulation[-1] for b in head.res_blocks),
    ]
    with torch.no_grad():
        for lin in zeroed:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
    # One 64 px row (2x2 tokens): CPU float16 matmuls are slow, and the overflows do not need many tokens.
    # Any respacing starts the head at t=999, where its posterior coefficient is ~2e4.
    params = [
        pipe.params(
            "a red circle above a blue square", seed=0, height=64, width=64, steps=2, residual_steps=4
        )
    ]
    results = pipe.generate(params)
    _assert_finite(results, config.generator.codebook_size)
    assert all(r.residual.abs().max() > 0 for r in results)  # the head really produced something


def test_layernorm2d_statistics_survive_float16_activations():
    """The decoder's last norm sees |x - mean| ~ 900 at 256 px: its square overflows float16 (max 65504)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g) * 600 + 50
    norm = LayerNorm2d(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(64, generator=g))
    ref = norm(x)
    half = norm.half()(x.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() < 0.01
