"""Goldens section A: DC-HT (small widths, real depths) against the official code's tensors.

Grids come from the golden tensors' shapes and the traced stages from the model built from the set's
``tokenizer_config.json``, so another golden set made the same way runs the same assertions.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.model.golden_utils import golden_tokenizer, max_diff


@pytest.fixture(scope="module")
def tok(golden_dir):
    return golden_tokenizer(golden_dir)


@pytest.fixture(scope="module")
def gold(golden_dir):
    return load_file(str(golden_dir / "tokenizer_golden.safetensors"))


@torch.no_grad()
def test_encoder_traces_and_latent(tok, gold):
    trace = {}
    z = tok.encoder(gold["input.images"], trace=trace)
    keys = [k for k in gold if k.startswith("trace.encoder.")]
    assert keys and {f"trace.{k}" for k in trace} == set(keys)  # every non-empty stage, stem and project-out
    for k in keys:
        assert max_diff(trace[k.removeprefix("trace.")], gold[k]) < 1e-4, k
    assert max_diff(z, gold["out.encoder_latent"]) < 1e-4


@torch.no_grad()
def test_quantizer_outputs(tok, gold):
    q = tok.encode(gold["input.images"])
    assert torch.equal(q.indices, gold["out.indices"])
    assert torch.equal(q.tokens, gold["out.tokens"])
    for ours, ref in (
        (q.normalized, "out.normalized_latent"),
        (q.codewords, "out.codeword_latent"),
        (q.quantized, "out.quantized_ste"),
        (q.residual, "out.residual"),
    ):
        assert max_diff(ours, gold[ref]) < 1e-5, ref


@torch.no_grad()
def test_decoder_traces_and_three_decode_paths(tok, gold):
    q = tok.encode(gold["input.images"])
    trace = {}
    tok.decoder(q.codewords + (q.normalized - q.codewords), trace=trace)
    keys = [k for k in gold if k.startswith("trace.decoder.")]
    assert keys and {f"trace.{k}" for k in trace} == set(keys)
    for k in keys:
        assert max_diff(trace[k.removeprefix("trace.")], gold[k]) < 2e-4, k
    grid = tuple(gold["out.indices"].shape[-2:])
    assert max_diff(tok.decode_tokens(q.tokens, grid), gold["out.decoded_discrete"]) < 5e-5
    assert max_diff(tok.decode_tokens(q.tokens, grid, q.residual), gold["out.decoded_hybrid"]) < 5e-5
    assert max_diff(tok.decode(q.normalized), gold["out.decoded_continuous"]) < 5e-5
    assert max_diff(tok(gold["input.images"]), gold["out.forward_discrete"]) < 5e-5


@torch.no_grad()
def test_second_input_resolution(tok, gold):
    # In the shipped set this input makes every attention take the linear form (tokenizer_golden.json).
    x = gold["input.images_extra"]
    q = tok.encode(x)
    assert max_diff(tok.encoder(x), gold["extra.encoder_latent"]) < 1e-4
    assert torch.equal(q.indices, gold["extra.indices"])
    assert torch.equal(q.tokens, gold["extra.tokens"])
    assert max_diff(q.residual, gold["extra.residual"]) < 1e-5
    grid = tuple(gold["extra.indices"].shape[-2:])
    assert grid != tuple(gold["out.indices"].shape[-2:])  # a second resolution, not the first one again
    assert max_diff(tok.decode_tokens(q.tokens, grid), gold["extra.decoded_discrete"]) < 5e-5
    assert max_diff(tok.decode_tokens(q.tokens, grid, q.residual), gold["extra.decoded_hybrid"]) < 5e-5


def test_encode_rejects_sizes_that_are_not_multiples_of_the_compression(tok, gold):
    f = tok.compression
    assert gold["input.images"].shape[-1] == f * gold["out.indices"].shape[-1]
    with pytest.raises(ValueError, match=f"multiple of {f}"):
        tok.encode(torch.zeros(1, 3, 3 * f + 4, 4 * f))
