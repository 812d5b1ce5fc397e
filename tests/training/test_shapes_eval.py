"""ShapesEval: the detector recovers ground-truth scenes, the scorer fails wrong images, the benchmark runs."""

from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageFilter

from dcar.training.captions import describe
from dcar.training.render import render
from dcar.training.scenes import sample_scene
from dcar.training.shapes_eval import (
    CATEGORIES,
    EVAL_PROMPTS,
    PromptSpec,
    detect,
    format_results,
    run_shapes_eval,
    scene_for_prompt,
    score,
)


def test_eval_prompts_are_in_distribution_and_well_formed():
    counts = Counter(spec.category for spec in EVAL_PROMPTS)
    assert set(counts) == set(CATEGORIES) and all(8 <= n <= 12 for n in counts.values())
    assert len({spec.prompt for spec in EVAL_PROMPTS}) == len(EVAL_PROMPTS)
    for spec in EVAL_PROMPTS:
        d = spec.description
        assert describe(d) == spec.prompt
        if spec.category in ("two_object", "position", "color_attr"):
            assert len(d.phrases) == 2 and d.phrases[0].shape != d.phrases[1].shape
        assert (d.relation is not None) == (spec.category == "position")
        assert (d.phrases[0].count > 1) == (spec.category == "counting")


def test_ground_truth_renderings_pass_their_prompts():
    verdicts = defaultdict(list)
    for k, spec in enumerate(EVAL_PROMPTS):
        for j, size in enumerate((256, 256, 256, 128)):
            scene = scene_for_prompt(spec, np.random.default_rng([k, j]))
            verdicts[spec.category].append(score(render(scene, size), spec))
    accuracy = {c: float(np.mean(v)) for c, v in verdicts.items()}
    assert all(acc >= 0.98 for acc in accuracy.values()), accuracy


def test_verdicts_survive_blur_noise_and_colour_shift():
    # A tokenizer's ordinary errors must not decide the ceiling: on the eval scenes, a 2 px Gaussian blur,
    # noise of sigma 20 and a colour shift of +30 leave every verdict true (measured: blur starts to cost at
    # 3-4 px), so a failing ceiling means outlines or objects were lost, not pixels.
    rng = np.random.default_rng(0)
    degrade = {
        "blur": lambda px: np.asarray(Image.fromarray(px).filter(ImageFilter.GaussianBlur(2)), np.float32),
        "noise": lambda px: px + rng.normal(0, 20, px.shape),
        "shift": lambda px: px + 30.0,
    }
    failed = Counter()
    for k, spec in enumerate(EVAL_PROMPTS):
        px = np.asarray(render(scene_for_prompt(spec, np.random.default_rng([k, 7])), 256))
        for name, f in degrade.items():
            image = Image.fromarray(np.clip(f(px), 0, 255).astype(np.uint8))
            failed[name] += not score(image, spec)
    assert sum(failed.values()) == 0, failed


def test_detector_recovers_every_object_of_random_scenes():
    matched = total = exact_count = 0
    for i in range(90):
        scene = sample_scene(np.random.default_rng(1000 + i))
        size = 128 if i % 3 == 0 else 256
        found = detect(render(scene, size))
        exact_count += len(found) == len(scene.objects)
        for o in scene.objects:
            total += 1
            matched += any(
                (d.shape, d.color, d.size) == (o.shape, o.color, o.size)
                and abs(d.x - o.x) < 0.03
                and abs(d.y - o.y) < 0.03
                for d in found
            )
    assert matched / total >= 0.98 and exact_count / 90 >= 0.98, (matched, total, exact_count)


def test_blank_and_noise_images_fail_every_prompt():
    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (256, 256), (128, 128, 128)),
        Image.new("RGB", (256, 256), (215, 25, 35)),  # a canvas of an object colour is still background
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    ]
    for image in images:
        assert detect(image) == []
        assert not any(score(image, spec) for spec in EVAL_PROMPTS)


def test_scorer_rejects_the_wrong_prompt():
    def gt(text, category):
        spec = PromptSpec.from_text(category, text)
        return render(scene_for_prompt(spec, np.random.default_rng(1)), 256)

    three = gt("three green triangles", "counting")
    assert score(three, PromptSpec.from_text("counting", "three green triangles"))
    assert not score(three, PromptSpec.from_text("counting", "four green triangles"))
    assert not score(three, PromptSpec.from_text("single_object", "a green triangle"))
    left = gt("a red circle to the left of a blue square", "position")
    assert not score(left, PromptSpec.from_text("position", "a red circle to the right of a blue square"))
    swapped = gt("a blue circle and a red square", "color_attr")
    assert not score(swapped, PromptSpec.from_text("color_attr", "a red circle and a blue square"))
    assert score(swapped, PromptSpec.from_text("two_object", "a red circle and a blue square"))
    assert not score(gt("a yellow square", "colors"), PromptSpec.from_text("colors", "an orange square"))


def test_run_shapes_eval_batches_and_reports():
    prompts = [s for c in CATEGORIES for s in [p for p in EVAL_PROMPTS if p.category == c][:2]]
    by_prompt = {s.prompt: s for s in prompts}
    calls = []

    def generate(texts, seeds):
        calls.append(len(texts))
        # A perfect generator for even seeds, a blank canvas for odd ones.
        return [
            render(scene_for_prompt(by_prompt[t], np.random.default_rng(s)), 128)
            if s % 2 == 0
            else Image.new("RGB", (128, 128), (128, 128, 128))
            for t, s in zip(texts, seeds, strict=True)
        ]

    results = run_shapes_eval(generate, size=128, seeds=(0, 1), prompts=prompts, batch_size=5)
    assert calls == [5, 5, 5, 5, 4] and results["num_images"] == 24
    assert results["categories"] == {c: 0.5 for c in CATEGORIES} and results["overall"] == 0.5
    assert all(r["passed"] == [True, False] for r in results["prompts"])
    table = format_results(results, per_prompt=True)
    assert "| **overall** | **0.500** |" in table and "| counting |" in table and prompts[0].prompt in table
