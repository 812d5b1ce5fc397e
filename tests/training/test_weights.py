"""The committed embedded default, weights/dcar-tiny-shapes: loads offline, stays small, draws what it is asked."""

from __future__ import annotations

from dcar.model.images import tensor_to_pil
from dcar.model.pipeline import Pipeline
from dcar.training.shapes_eval import EVAL_PROMPTS, detect, verdict
from dcar.weights import embedded_weights

DEFAULT_WEIGHTS = embedded_weights()

MAX_BYTES = 40 * 1024 * 1024


def test_directory_is_small_and_complete():
    files = [p for p in DEFAULT_WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_BYTES
    for name in (
        "model_index.json",
        "README.md",
        "samples.png",
        "tokenizer/model.safetensors",
        "generator/model.safetensors",
        "text_encoder/config.json",
    ):
        assert (DEFAULT_WEIGHTS / name).is_file(), name


def test_a_red_circle_passes_shapes_eval():
    pipe = Pipeline.from_pretrained(DEFAULT_WEIGHTS)
    spec = next(p for p in EVAL_PROMPTS if p.prompt == "a red circle")
    [result] = pipe.generate([pipe.params(spec.prompt, seed=0, height=256, width=256, steps=12)])
    dets = detect(tensor_to_pil(result.image))
    assert verdict(dets, spec), [str(d) for d in dets]
