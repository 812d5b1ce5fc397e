"""The tokenizer ceiling: ShapesEval of ground-truth scenes after encode -> decode.

A generator can only emit what the tokenizer decodes. For each evaluation prompt and seed a scene
that makes the prompt true is drawn (``scene_for_prompt``) and rendered; ShapesEval's detector scores

* ``truth``: the rendering itself (the detector's own ceiling; 1.00 by construction of the scenes),
* ``continuous``: the decoder on the normalised continuous latent,
* ``hybrid``: the decoder on codewords + the true residuals, stored in float16 as the pre-tokenized
  dataset stores them (what a perfect generator with a perfect residual head would decode),
* ``discrete``: the decoder on the codewords alone (a perfect generator without residuals).

The discrete row is the score no generator can pass without its residual head, so it is measured
before any generator is trained (at each tokenizer stage end too, training/train_tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcar.model.images import pil_to_tensor, tensor_to_pil
from dcar.model.tokenizer import DCHT
from dcar.training.render import render
from dcar.training.shapes_eval import CATEGORIES, EVAL_PROMPTS, PromptSpec, run_shapes_eval, scene_for_prompt

PATHS = ("truth", "continuous", "hybrid", "discrete")
CEILING_SEED = 4321  # scenes of the ceiling: drawn from (this, seed, prompt index), never a training stream


def ceiling_images(
    tok: DCHT, specs: Sequence[PromptSpec], seeds: Sequence[int], size: int, prompt_index: Sequence[int]
) -> dict[str, list[Image.Image]]:
    """{path: one image per (spec, seed)} for the scenes of those prompts (indices seed their draw)."""
    scenes = [
        scene_for_prompt(s, np.random.default_rng([CEILING_SEED, seed, i]))
        for s, seed, i in zip(specs, seeds, prompt_index, strict=True)
    ]
    truth = [render(sc, size) for sc in scenes]
    weight = next(tok.parameters())
    x = torch.stack([pil_to_tensor(im) for im in truth]).to(weight.device, weight.dtype)
    q = tok.encode(x)
    grid = tuple(q.indices.shape[-2:])
    decoded = {
        "continuous": tok.decode(q.normalized),
        "hybrid": tok.decode_tokens(q.tokens, grid, q.residual.to(torch.float16)),
        "discrete": tok.decode_tokens(q.tokens, grid),
    }
    out = {"truth": truth}
    for path, images in decoded.items():
        out[path] = [tensor_to_pil((im.float() * 0.5 + 0.5).clamp(0, 1)) for im in images]
    return out


@torch.inference_mode()
def tokenizer_ceiling(
    tok: DCHT,
    size: int = 256,
    seeds: Sequence[int] = (0, 1, 2, 3),
    prompts: Sequence[PromptSpec] = EVAL_PROMPTS,
    batch_size: int = 16,
) -> dict[str, Any]:
    """ShapesEval per path: ``{"size", "seeds", "num_images", "paths": {path: {"categories", "overall"}}}``.

    The tokenizer runs in eval mode for the measurement and is left in the mode it was in.
    """
    modes = {m: m.training for m in tok.modules()}
    tok.eval()
    index = {p.prompt: i for i, p in reversed(list(enumerate(prompts)))}
    cache: dict[tuple[str, int], dict[str, Image.Image]] = {}

    def fill(texts: list[str], row_seeds: list[int]) -> None:
        todo = [(t, s) for t, s in zip(texts, row_seeds, strict=True) if (t, s) not in cache]
        if not todo:
            return
        images = ceiling_images(
            tok, [prompts[index[t]] for t, _ in todo], [s for _, s in todo], size, [index[t] for t, _ in todo]
        )
        for k, key in enumerate(todo):
            cache[key] = {p: images[p][k] for p in PATHS}

    def generator_for(path: str):
        def generate(texts: list[str], row_seeds: list[int]) -> list[Image.Image]:
            fill(texts, row_seeds)
            return [cache[(t, s)][path] for t, s in zip(texts, row_seeds, strict=True)]

        return generate

    try:
        paths = {}
        for path in PATHS:
            r = run_shapes_eval(
                generator_for(path), size=size, seeds=seeds, prompts=prompts, batch_size=batch_size
            )
            paths[path] = {"categories": r["categories"], "overall": r["overall"]}
            num = r["num_images"]
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {"size": size, "seeds": list(seeds), "num_images": num, "paths": paths}


def format_ceiling(result: dict[str, Any]) -> str:
    """A Markdown table: one row per path, one column per ShapesEval category, and the overall score."""
    cats = [c for c in CATEGORIES if c in result["paths"]["truth"]["categories"]]
    lines = [
        "| path | " + " | ".join(c.replace("_", " ") for c in cats) + " | **overall** |",
        "| --- |" + " ---: |" * (len(cats) + 1),
    ]
    for path, r in result["paths"].items():
        cells = " | ".join(f"{r['categories'][c]:.3f}" for c in cats)
        lines.append(f"| {path} | {cells} | **{r['overall']:.3f}** |")
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines.append(
        f"\n{result['num_images']} ground-truth scenes per path at {result['size']} px (scene seeds {seeds})."
    )
    return "\n".join(lines)
