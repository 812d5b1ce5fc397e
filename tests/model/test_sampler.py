"""Sampler contract: determinism, batch invariance, no global RNG, step-wise batching, edits."""

from __future__ import annotations

import pytest
import torch

from dcar.model.maskgit import guidance_at
from dcar.model.params import SamplingParams
from dcar.model.sampler import BatchState


def test_same_seed_same_image_and_different_seed_differs(tiny_pipe):
    a = tiny_pipe.generate([tiny_pipe.params("a red circle", seed=7)])[0]
    b = tiny_pipe.generate([tiny_pipe.params("a red circle", seed=7)])[0]
    c = tiny_pipe.generate([tiny_pipe.params("a red circle", seed=8)])[0]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.image, b.image)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.image.shape == (3, 128, 128) and 0 <= a.image.min() and a.image.max() <= 1


def test_row_in_a_batch_equals_the_row_alone(tiny_pipe):
    rows = [
        tiny_pipe.params("two blue squares", seed=11),
        tiny_pipe.params("a yellow triangle above a purple square", seed=3, guidance_scale=2.0),
        tiny_pipe.params("x", seed=5, steps=8),
        tiny_pipe.params("a green circle in the top left corner", seed=99, randomize_temperature=0.5),
    ]
    before = torch.random.get_rng_state()
    batch = tiny_pipe.generate(rows)
    alone = [tiny_pipe.generate([r])[0] for r in rows]
    assert torch.equal(before, torch.random.get_rng_state()), "the global RNG was touched"
    for b, a in zip(batch, alone):
        assert torch.equal(b.tokens, a.tokens)
        assert (b.image - a.image).abs().max() < 1e-5


def test_a_row_admitted_mid_batch_finishes_as_if_alone(tiny_pipe):
    first = tiny_pipe.params("a red circle", seed=1)
    late = tiny_pipe.params("three green triangles", seed=2)
    sampler = tiny_pipe.sampler
    state = sampler.start([first], tags=["first"])
    for _ in range(5):
        sampler.step(state)
    state = BatchState.merge(state, sampler.start([late], tags=["late"]))
    assert [r.step for r in state.rows] == [5, 0]  # rows at different step indices share forwards
    results = {}
    while len(state):
        sampler.step(state)
        done, state = sampler.finish(state)
        results.update({r.tag: r for r in done})
    for tag, params in (("first", first), ("late", late)):
        alone = tiny_pipe.generate([params])[0]
        assert torch.equal(results[tag].tokens, alone.tokens)
        assert (results[tag].image - alone.image).abs().max() < 1e-5


def test_dropping_a_row_leaves_the_others_unchanged(tiny_pipe):
    keep, drop = tiny_pipe.params("a red circle", seed=4), tiny_pipe.params("a blue square", seed=6)
    sampler = tiny_pipe.sampler
    state = sampler.start([keep, drop], tags=[0, 1])
    sampler.step(state)
    state = state.select([0])
    while len(state):
        sampler.step(state)
        done, state = sampler.finish(state)
    assert torch.equal(done[0].tokens, tiny_pipe.generate([keep])[0].tokens)


def test_step_events_report_progress_in_order(tiny_pipe):
    events = []
    tiny_pipe.generate([tiny_pipe.params("a", seed=0)], callback=lambda ev, st: events.extend(ev))
    assert [e.step for e in events] == list(range(1, 13))
    revealed = [e.revealed for e in events]
    assert revealed == sorted(revealed) and revealed[-1] == 16 and revealed[0] >= 1


def test_all_steps_and_stages_are_timed(tiny_pipe):
    res = tiny_pipe.generate([tiny_pipe.params("a", seed=0)])[0]
    assert set(res.timings) == {"text_encode", "unmask", "residual", "decode"}
    assert all(v > 0 for v in res.timings.values())


def test_discrete_only_differs_from_hybrid_only_in_residuals(tiny_pipe):
    hybrid = tiny_pipe.generate([tiny_pipe.params("a", seed=3)])[0]
    discrete = tiny_pipe.generate([tiny_pipe.params("a", seed=3, use_residuals=False)])[0]
    assert torch.equal(hybrid.tokens, discrete.tokens)
    assert not torch.equal(hybrid.image, discrete.image)


def _edit_inputs(tiny_pipe):
    source = tiny_pipe.generate([tiny_pipe.params("a purple square", seed=21)])[0]
    image = source.image * 2 - 1
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1  # regenerate the left half
    return image, mask


def test_edit_keeps_tokens_and_pixels_outside_the_mask(tiny_pipe):
    image, mask = _edit_inputs(tiny_pipe)
    edit = tiny_pipe.prepare_edit(image, mask)
    assert edit.token_mask.view(4, 4)[:, :2].all() and not edit.token_mask.view(4, 4)[:, 2:].any()
    out = tiny_pipe.generate([tiny_pipe.params("a red circle", seed=5)], [edit])[0]
    keep = ~edit.token_mask
    assert torch.equal(out.tokens[keep], edit.tokens[keep])
    expected = (image * 0.5 + 0.5).clamp(0, 1)
    assert (out.image[:, :, 64:] - expected[:, :, 64:]).abs().max() < 1e-6
    assert not torch.equal(out.tokens[edit.token_mask], edit.tokens[edit.token_mask])


def test_edit_token_mask_marks_a_patch_touched_by_one_pixel(tiny_pipe):
    image, _ = _edit_inputs(tiny_pipe)
    mask = torch.zeros(1, 128, 128)
    mask[0, 40, 70] = 1  # one pixel in token (row 1, col 2)
    edit = tiny_pipe.prepare_edit(image, mask)
    assert edit.token_mask.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_edit_with_an_all_ones_mask_equals_plain_generation(tiny_pipe):
    image, _ = _edit_inputs(tiny_pipe)
    edit = tiny_pipe.prepare_edit(image, torch.ones(1, 128, 128))
    params = tiny_pipe.params("a red circle", seed=5)
    a = tiny_pipe.generate([params], [edit])[0]
    b = tiny_pipe.generate([params])[0]
    assert torch.equal(a.tokens, b.tokens)
    assert (a.image - b.image).abs().max() < 1e-5


def test_edit_with_an_empty_mask_returns_the_input_tokens(tiny_pipe):
    image, _ = _edit_inputs(tiny_pipe)
    edit = tiny_pipe.prepare_edit(image, torch.zeros(1, 128, 128))
    out = tiny_pipe.generate([tiny_pipe.params("a red circle", seed=5)], [edit])[0]
    assert torch.equal(out.tokens, edit.tokens)


def test_edits_and_generations_share_a_batch(tiny_pipe):
    image, mask = _edit_inputs(tiny_pipe)
    edit = tiny_pipe.prepare_edit(image, mask)
    gen_p, edit_p = tiny_pipe.params("a", seed=1), tiny_pipe.params("b", seed=2)
    both = tiny_pipe.generate([gen_p, edit_p], [None, edit])
    assert torch.equal(both[0].tokens, tiny_pipe.generate([gen_p])[0].tokens)
    assert torch.equal(both[1].tokens, tiny_pipe.generate([edit_p], [edit])[0].tokens)


def test_mask_of_another_size_is_refused(tiny_pipe):
    image, _ = _edit_inputs(tiny_pipe)
    with pytest.raises(ValueError, match="mask size"):
        tiny_pipe.prepare_edit(image, torch.ones(1, 64, 64))


def test_rows_of_different_sizes_cannot_share_a_batch(tiny_pipe):
    with pytest.raises(ValueError, match="token grid"):
        tiny_pipe.sampler.start([tiny_pipe.params("a"), tiny_pipe.params("b", height=64, width=64)])


def test_other_sizes_use_the_sincos_position_rule(tiny_pipe):
    res = tiny_pipe.generate([tiny_pipe.params("a", seed=0, height=64, width=96)])[0]
    assert res.image.shape == (3, 64, 96) and res.tokens.shape == (6,)


@pytest.mark.parametrize("decay", ["constant", "linear", "power-cosine"])
def test_guidance_decays(decay):
    g = [guidance_at(decay, 4.5, s, 12) for s in range(12)]
    if decay == "constant":
        assert g == [4.5] * 12
    elif decay == "linear":
        assert g[0] == 0 and g[-1] == pytest.approx(4.5 * 11 / 12)
    else:
        assert g[0] == 0 and g == sorted(g)


def test_invalid_params_name_the_field():
    with pytest.raises(ValueError, match="guidance_decay"):
        SamplingParams("a", guidance_decay="cosine")
    with pytest.raises(ValueError, match="steps"):
        SamplingParams("a", steps=0)


def test_a_step_that_fails_leaves_the_batch_and_its_randomness_as_they_were(tiny_pipe):
    params = [tiny_pipe.params("a red circle", seed=12), tiny_pipe.params("b", seed=13)]
    sampler = tiny_pipe.sampler
    state = sampler.start(params, tags=[0, 1])
    sampler.step(state)
    draw = state.noise.uniform

    def fail_after_drawing(kind, shape, device):
        out = draw(kind, shape, device)  # the token noise is drawn (the generators advance) ...
        if kind == "confidence":
            raise RuntimeError("CUDA out of memory (simulated)")  # ... then the step fails
        return out

    state.noise.uniform = fail_after_drawing
    ids_before = state.ids.clone()
    with pytest.raises(RuntimeError, match="simulated"):
        sampler.step(state)
    assert torch.equal(state.ids, ids_before) and [r.step for r in state.rows] == [1, 1]
    del state.noise.uniform
    while len(state):
        sampler.step(state)
        done, state = sampler.finish(state)
    expected = tiny_pipe.generate([params[1]])[0]
    assert torch.equal(done[1].tokens, expected.tokens)
