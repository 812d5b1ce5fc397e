"""Goldens sections B-E: generator forward, diffusion head and schedule, mask schedule, sampling replays.

Sizes come from the model built from the golden set's ``generator_config.json`` or from the tensors' shapes;
seeds, guidance scales and recipes from its ``*_golden.json`` files, so any set made the same way runs here.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dcar.model.diffusion import DiffusionSchedule
from dcar.model.maskgit import schedule_counts
from dcar.model.noise import OfficialOrderNoise
from dcar.model.params import SamplingParams
from dcar.model.sampler import Sampler
from dcar.model.transformer import sincos_pos_embed_2d
from tests.model.golden_utils import (
    cfg_tag,
    golden_generator,
    golden_tokenizer,
    head_sample_calls,
    max_diff,
    read_json,
)


@pytest.fixture(scope="module")
def gen(golden_dir):
    return golden_generator(golden_dir)


@pytest.fixture(scope="module")
def gold(golden_dir):
    return load_file(str(golden_dir / "generator_golden.safetensors"))


@pytest.fixture(scope="module")
def meta(golden_dir):
    return read_json(golden_dir, "generator_golden.json")


def _grid(gen) -> tuple[int, int]:
    return gen.cfg.grid_size, gen.cfg.grid_size


def test_pos_embed_initialiser_matches_official_table(gen, gold):
    table = sincos_pos_embed_2d(gen.cfg.hidden_size, _grid(gen), gen.cfg.pos_embed_base_size)
    assert max_diff(table, gold["ref.pos_embed_sincos_before_perturb"]) < 2e-5


@torch.no_grad()
def test_forward_cfg_batch(gen, gold, meta):
    ids, h, m = gold["input.ids"], gold["input.encoder_hidden_states"], gold["input.encoder_attention_mask"]
    rows = ids.shape[0]
    assert max_diff(gen.embed(ids, _grid(gen)), gold["ref.x_embedded_plus_pos"]) < 2e-5  # stored pos_embed
    drop = torch.tensor([False] * rows + [True] * rows)  # generate()'s doubled batch: cond rows, then uncond
    assert max_diff(gen.y_embedder(torch.cat([h, h]), drop), gold["trace.y_embedder_out"]) < 2e-5
    trace = {}
    logits, hidden = gen(
        torch.cat([ids, ids]), gen.text_kv(torch.cat([h, h]), torch.cat([m, m]), drop), trace=trace
    )
    block_keys = [k for k in gold if k.startswith("trace.blocks.")]
    assert len(block_keys) == gen.cfg.num_layers
    assert {f"trace.{k}" for k in trace if k.startswith("blocks.")} == set(block_keys)
    for k in block_keys:
        assert max_diff(trace[k.removeprefix("trace.")], gold[k]) < 2e-5, k
    lc, lu = logits.chunk(2)
    hc, hu = hidden.chunk(2)
    assert max_diff(lc, gold["out.logits_cond"]) < 2e-5
    assert max_diff(lu, gold["out.logits_uncond"]) < 2e-5
    assert max_diff(hc, gold["out.hidden_cond"]) < 2e-5
    assert max_diff(hu, gold["out.hidden_uncond"]) < 2e-5
    scale = meta["cfg_scale"]
    assert max_diff(lc + scale * (lc - lu), gold["out.logits_cfg"]) < 1e-4
    plain_logits, plain_hidden = gen(ids, gen.text_kv(h, m))
    assert max_diff(plain_logits, gold["out.logits_plain"]) < 2e-5
    assert max_diff(plain_hidden, gold["out.hidden_plain"]) < 2e-5


@torch.no_grad()
def test_padded_caption_positions_have_no_influence(gen, gold):
    ids, h, m = gold["input.ids"], gold["input.encoder_hidden_states"], gold["input.encoder_attention_mask"]
    assert not m.bool().all(), "the golden captions should include padded positions"
    poisoned = torch.where(m.bool().unsqueeze(-1), h, torch.full_like(h, 1e3))
    a, _ = gen(ids, gen.text_kv(h, m))
    b, _ = gen(ids, gen.text_kv(poisoned, m))
    assert max_diff(a, b) < 1e-6


@torch.no_grad()
def test_diffusion_head_network_and_cfg(gen, gold, meta):
    net, channels = gen.diffloss.net, gen.cfg.token_size
    x, t, c = gold["diffhead.input.x_t"], gold["diffhead.input.t_orig"], gold["diffhead.input.c"]
    half = x.shape[0] // 2  # the CFG wrapper's rows: the first half conditional, the second unconditional
    scale = meta["cfg_scale"]
    assert max_diff(net(x, t, c), gold["diffhead.out.net"]) < 3e-5
    ref = gold[f"diffhead.out.net_{cfg_tag(scale)}"]
    out = net.forward_with_cfg(x[:half], t, c[:half], c[half:], torch.full((half,), scale))
    assert max_diff(out, ref[:half]) < 1e-4
    assert max_diff(out[:, :channels], ref[half:, :channels]) < 1e-4  # both halves carry the guided epsilon


@torch.no_grad()
def test_p_mean_variance_plain_and_cfg(gen, gold, meta):
    net, channels = gen.diffloss.net, gen.cfg.token_size
    sched = gen.diffloss.schedule(gen.cfg.head.num_sampling_steps)
    x, t_orig, t_idx, c = (gold[f"diffhead.input.{k}"] for k in ("x_t", "t_orig", "t_index", "c"))
    half, scale = x.shape[0] // 2, meta["cfg_scale"]
    mean, log_var, x0 = sched.p_mean_variance(net(x, t_orig, c), x, t_idx)
    assert max_diff(mean, gold["diffhead.out.pmv.mean"]) < 5e-5
    assert max_diff(log_var, gold["diffhead.out.pmv.log_variance"]) < 2e-4
    assert max_diff(x0, gold["diffhead.out.pmv.pred_xstart"]) < 1e-3
    guided = net.forward_with_cfg(x[:half], t_orig, c[:half], c[half:], torch.full((half,), scale))
    # The official wrapper returns the doubled batch: guided eps twice, each half with its own variance.
    variance_u = net(x[:half], t_orig[half:], c[half:])[:, channels:]
    full = torch.cat([guided, torch.cat([guided[:, :channels], variance_u], 1)])
    mean, log_var, x0 = sched.p_mean_variance(full, x, t_idx)
    pmv = f"diffhead.out.pmv_{cfg_tag(scale)}"
    assert max_diff(mean, gold[f"{pmv}.mean"]) < 5e-5
    assert max_diff(log_var, gold[f"{pmv}.log_variance"]) < 2e-4
    assert max_diff(x0, gold[f"{pmv}.pred_xstart"]) < 1e-3


def test_respaced_schedule_arrays(golden_dir, gen):
    meta = read_json(golden_dir, "diffusion_schedule.json")
    ref = load_file(str(golden_dir / "diffusion_schedule.safetensors"))
    steps = int(meta["num_sampling_steps"])
    assert steps == gen.cfg.head.num_sampling_steps  # the generator config and the schedule agree
    sched = DiffusionSchedule.create(meta["diffusion_steps"], meta["noise_schedule"], respace=steps)
    assert sched.timestep_map.tolist() == ref["timestep_map"].tolist() == meta["timestep_map"]
    for name, value in ref.items():
        if name == "timestep_map" or name.startswith("base"):
            continue
        ours = torch.from_numpy(getattr(sched, name))
        assert ((ours - value).abs() / value.abs().clamp(min=1e-300)).max() < 1e-12, name
    base = DiffusionSchedule.create(meta["diffusion_steps"], meta["noise_schedule"])
    base_prefix = f"base{meta['diffusion_steps']}_"
    assert torch.allclose(torch.from_numpy(base.betas), ref[f"{base_prefix}betas"], rtol=1e-12, atol=0)
    assert torch.allclose(
        torch.from_numpy(base.alphas_cumprod), ref[f"{base_prefix}alphas_cumprod"], rtol=1e-12, atol=0
    )


def test_mask_schedule_counts(golden_dir):
    schedules = read_json(golden_dir, "mask_schedule.json")["schedules"]
    assert schedules
    for key, ref in schedules.items():
        tokens, steps = ref["masked_at_step_input"][0], len(ref["remaining_masked_after_step"])
        assert schedule_counts(tokens, steps) == ref["remaining_masked_after_step"], key


def _guided_call(meta):
    calls = [call for call in head_sample_calls(meta) if call.cfg != 1.0]
    assert len(calls) == 1, calls
    return calls[0]


@torch.no_grad()
def test_head_sampler_replays_recorded_noise(gen, gold, meta):
    call = _guided_call(meta)
    z = gold["diffsample.input.z"]
    half = z.shape[0] // 2  # rows of z: the conditional half, then the unconditional half
    init = gold[f"diffsample.ref.{call.tag}.initial_noise"]
    steps = iter(gold[f"diffsample.ref.{call.tag}.step_noise"])

    def noise(kind):
        return init if kind == "init" else next(steps)[:half]  # the conditional half's noise

    out = gen.diffloss.sample(
        z[:half],
        noise,
        uncond=z[half:],
        guidance=torch.full((half,), call.cfg),
        steps=gen.cfg.head.num_sampling_steps,
    )
    # The second half of the official output is the discarded unconditional copy; the first is the result.
    assert max_diff(out, gold[f"diffsample.out.{call.tag}"][:half]) < 1e-4


@torch.no_grad()
def test_head_sampler_with_seeded_generators(gen, gold, meta):
    z = gold["diffsample.input.z"]
    unguided = [call for call in head_sample_calls(meta) if call.cfg == 1.0]
    assert unguided
    for call in unguided:
        ref = gold[f"diffsample.out.{call.tag}"]
        g = torch.Generator().manual_seed(call.seed)
        out = gen.diffloss.sample(
            z[: ref.shape[0]],
            lambda kind, g=g, shape=ref.shape: torch.randn(shape, generator=g),
            steps=gen.cfg.head.num_sampling_steps,
        )
        assert max_diff(out, ref) < 1e-4, call.tag


@torch.no_grad()
def test_generate_reproduces_official_ids_and_residuals(golden_dir, gen, gold, meta):
    call = meta["generate_call"]
    tokenizer = golden_tokenizer(golden_dir)
    sampler = Sampler(gen, tokenizer, text_encoder=None)
    side = gen.cfg.grid_size * tokenizer.compression
    params = [
        SamplingParams(
            prompt,
            height=side,
            width=side,
            steps=call["num_sample_steps"],
            guidance_scale=call["guidance_scale"],
            guidance_decay=call["guidance_decay"],
            randomize_temperature=call["randomize_temperature"],
            softmax_temperature_annealing=call["softmax_temperature_annealing"],
            residual_steps=gen.cfg.head.num_sampling_steps,
        )
        for prompt in call["condition"]
    ]
    rows = len(params)
    text = (gold["generate.input.encoder_hidden_states"], gold["generate.input.encoder_attention_mask"])
    generator = torch.Generator().manual_seed(call["torch_manual_seed_before_call"])
    state = sampler.start(params, text=text, noise=OfficialOrderNoise(generator, rows))
    counts = []
    while not state.rows[0].done:
        counts.append((state.ids == gen.cfg.mask_token_id).sum(1).tolist())
        sampler.step(state)
    assert len(counts) == call["num_sample_steps"]
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
    assert len(rest) == 0 and len(results) == rows
    assert max_diff(captured["residual"], gold["generate.out.residual_features"]) < 1e-4
