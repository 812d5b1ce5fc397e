"""Goldens sections B-E: generator forward, diffusion head and schedule, mask schedule, sampling replays."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dcar.model.diffusion import DiffusionSchedule
from dcar.model.maskgit import schedule_counts
from dcar.model.noise import OfficialOrderNoise
from dcar.model.params import SamplingParams
from dcar.model.sampler import Sampler
from dcar.model.transformer import sincos_pos_embed_2d
from tests.model.golden_utils import golden_generator, golden_tokenizer, max_diff


@pytest.fixture(scope="module")
def gen(golden_dir):
    return golden_generator(golden_dir)


@pytest.fixture(scope="module")
def gold(golden_dir):
    return load_file(str(golden_dir / "generator_golden.safetensors"))


def test_pos_embed_initialiser_matches_official_table(gen, gold):
    table = sincos_pos_embed_2d(64, (4, 4), gen.cfg.pos_embed_base_size)
    assert max_diff(table, gold["ref.pos_embed_sincos_before_perturb"]) < 2e-5


@torch.no_grad()
def test_forward_cfg_batch(gen, gold):
    ids, h, m = gold["input.ids"], gold["input.encoder_hidden_states"], gold["input.encoder_attention_mask"]
    assert max_diff(gen.embed(ids, (4, 4)), gold["ref.x_embedded_plus_pos"]) < 2e-5  # stored pos_embed is used
    drop = torch.tensor([False, False, True, True])
    assert max_diff(gen.y_embedder(torch.cat([h, h]), drop), gold["trace.y_embedder_out"]) < 2e-5
    trace = {}
    logits, hidden = gen(torch.cat([ids, ids]), gen.text_kv(torch.cat([h, h]), torch.cat([m, m]), drop),
                         trace=trace)
    for i in range(2):
        assert max_diff(trace[f"blocks.{i}"], gold[f"trace.blocks.{i}"]) < 2e-5
    lc, lu = logits.chunk(2)
    hc, hu = hidden.chunk(2)
    assert max_diff(lc, gold["out.logits_cond"]) < 2e-5
    assert max_diff(lu, gold["out.logits_uncond"]) < 2e-5
    assert max_diff(hc, gold["out.hidden_cond"]) < 2e-5
    assert max_diff(hu, gold["out.hidden_uncond"]) < 2e-5
    assert max_diff(lc + 4.5 * (lc - lu), gold["out.logits_cfg"]) < 1e-4
    plain_logits, plain_hidden = gen(ids, gen.text_kv(h, m))
    assert max_diff(plain_logits, gold["out.logits_plain"]) < 2e-5
    assert max_diff(plain_hidden, gold["out.hidden_plain"]) < 2e-5


@torch.no_grad()
def test_padded_caption_positions_have_no_influence(gen, gold):
    ids, h, m = gold["input.ids"], gold["input.encoder_hidden_states"], gold["input.encoder_attention_mask"]
    poisoned = torch.where(m.bool().unsqueeze(-1), h, torch.full_like(h, 1e3))
    a, _ = gen(ids, gen.text_kv(h, m))
    b, _ = gen(ids, gen.text_kv(poisoned, m))
    assert max_diff(a, b) < 1e-6


@torch.no_grad()
def test_diffusion_head_network_and_cfg(gen, gold):
    net = gen.diffloss.net
    x, t, c = gold["diffhead.input.x_t"], gold["diffhead.input.t_orig"], gold["diffhead.input.c"]
    assert max_diff(net(x, t, c), gold["diffhead.out.net"]) < 3e-5
    ref = gold["diffhead.out.net_cfg4.5"]
    out = net.forward_with_cfg(x[:3], t, c[:3], c[3:], torch.full((3,), 4.5))
    assert max_diff(out, ref[:3]) < 1e-4
    assert max_diff(out[:, :32], ref[3:, :32]) < 1e-4  # both halves carry the same guided epsilon


@torch.no_grad()
def test_p_mean_variance_plain_and_cfg(gen, gold):
    net, sched = gen.diffloss.net, gen.diffloss.schedule(32)
    x, t_orig, t_idx, c = (gold[f"diffhead.input.{k}"] for k in ("x_t", "t_orig", "t_index", "c"))
    mean, log_var, x0 = sched.p_mean_variance(net(x, t_orig, c), x, t_idx)
    assert max_diff(mean, gold["diffhead.out.pmv.mean"]) < 5e-5
    assert max_diff(log_var, gold["diffhead.out.pmv.log_variance"]) < 2e-4
    assert max_diff(x0, gold["diffhead.out.pmv.pred_xstart"]) < 1e-3
    guided = net.forward_with_cfg(x[:3], t_orig, c[:3], c[3:], torch.full((3,), 4.5))
    # The official wrapper returns the doubled batch: guided eps twice, each half with its own variance.
    full = torch.cat([guided, torch.cat([guided[:, :32], net(x[:3], t_orig[3:], c[3:])[:, 32:]], 1)])
    mean, log_var, x0 = sched.p_mean_variance(full, x, t_idx)
    assert max_diff(mean, gold["diffhead.out.pmv_cfg4.5.mean"]) < 5e-5
    assert max_diff(log_var, gold["diffhead.out.pmv_cfg4.5.log_variance"]) < 2e-4
    assert max_diff(x0, gold["diffhead.out.pmv_cfg4.5.pred_xstart"]) < 1e-3


def test_respaced_schedule_arrays(golden_dir):
    ref = load_file(str(golden_dir / "diffusion_schedule.safetensors"))
    sched = DiffusionSchedule.create(1000, "cosine", respace=32)
    assert sched.timestep_map.tolist() == ref["timestep_map"].tolist()
    for name, value in ref.items():
        if name == "timestep_map" or name.startswith("base1000"):
            continue
        ours = torch.from_numpy(getattr(sched, name))
        assert ((ours - value).abs() / value.abs().clamp(min=1e-300)).max() < 1e-12, name
    base = DiffusionSchedule.create(1000, "cosine")
    assert torch.allclose(torch.from_numpy(base.betas), ref["base1000_betas"], rtol=1e-12, atol=0)
    assert torch.allclose(torch.from_numpy(base.alphas_cumprod), ref["base1000_alphas_cumprod"], rtol=1e-12, atol=0)


def test_mask_schedule_counts(golden_dir):
    ref = json.loads((golden_dir / "mask_schedule.json").read_text())["schedules"]
    for key, (tokens, steps) in {"steps12_tokens256": (256, 12), "steps8_tokens64": (64, 8)}.items():
        assert schedule_counts(tokens, steps) == ref[key]["remaining_masked_after_step"], key


@torch.no_grad()
def test_head_sampler_replays_recorded_noise(gen, gold):
    z = gold["diffsample.input.z"]
    init = gold["diffsample.ref.cfg4.5_seed4242.initial_noise"]
    steps = iter(gold["diffsample.ref.cfg4.5_seed4242.step_noise"])

    def noise(kind):
        return init if kind == "init" else next(steps)[:4]  # the conditional half's noise

    out = gen.diffloss.sample(z[:4], noise, uncond=z[4:], guidance=torch.full((4,), 4.5), steps=32)
    # Rows 4-7 of the official output are the discarded unconditional copy; rows 0-3 are the result.
    assert max_diff(out, gold["diffsample.out.cfg4.5_seed4242"][:4]) < 1e-4


@torch.no_grad()
def test_head_sampler_with_seeded_generators(gen, gold):
    z = gold["diffsample.input.z"]
    g = torch.Generator().manual_seed(4243)
    out = gen.diffloss.sample(z[:4], lambda kind: torch.randn(4, 32, generator=g), steps=32)
    assert max_diff(out, gold["diffsample.out.nocfg_seed4243"]) < 1e-4


@torch.no_grad()
def test_generate_reproduces_official_ids_and_residuals(golden_dir, gen, gold):
    sampler = Sampler(gen, golden_tokenizer(golden_dir), text_encoder=None)
    params = [SamplingParams(f"p{i}", height=128, width=128) for i in range(2)]
    text = (gold["generate.input.encoder_hidden_states"], gold["generate.input.encoder_attention_mask"])
    state = sampler.start(params, text=text, noise=OfficialOrderNoise(torch.Generator().manual_seed(20250709), 2))
    counts = []
    while not state.rows[0].done:
        counts.append((state.ids == gen.cfg.mask_token_id).sum(1).tolist())
        sampler.step(state)
    assert counts == gold["generate.out.masked_count_at_step_input"].tolist()
    assert torch.equal(state.ids, gold["generate.out.ids"])
    captured = {}
    decode = sampler.tokenizer.decode_tokens

    def spy(tokens, grid, residual=None):
        captured["residual"] = residual
        return decode(tokens, grid, residual)

    sampler.tokenizer.decode_tokens = spy
    try:
        results, rest = sampler.finish(state)
    finally:
        del sampler.tokenizer.decode_tokens
    assert len(rest) == 0 and len(results) == 2
    assert max_diff(captured["residual"], gold["generate.out.residual_features"]) < 1e-4
