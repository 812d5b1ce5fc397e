"""Resumable data streams for training: random crops of rendered scenes, and a pre-tokenized dataset.

``SceneCrops`` draws the same scenes as ``SceneDataset(seed=seed, rank=rank)`` (the same
``stream_rng(seed, TRAIN_STREAM, rank, 0)`` generator), but keeps its generator state in the open so a
checkpoint can store it and a resumed run continues with the very next scene. ``TokenData`` walks a
pre-tokenized dataset (training/pretokenize.py) epoch by epoch in a seeded order, rank ``r`` of ``w``
taking every w-th item, and re-draws each scene's caption every time it is visited.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dcar.training.captions import caption
from dcar.training.dataset import TRAIN_STREAM, captioned_scene, image_to_tensor, stream_rng
from dcar.training.render import render
from dcar.training.scenes import RELATIONS, Scene

# Stream ids beside the dataset's (TRAIN_STREAM = 0, EVAL_STREAM = 1), for draws that are not scenes.
CROP_STREAM = 2
ORDER_STREAM = 3
CAPTION_STREAM = 4

_MIRROR = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
assert set(_MIRROR) == set(RELATIONS)


class SceneCrops:
    """Endless batches of random ``crop`` x ``crop`` windows of scenes rendered at ``render_size``.

    Drawing a scene costs ~20 ms at 256 px (4x supersampled), several times a GPU's tokenizer step, so
    ``workers`` processes may render the next scenes ahead (a GPU host's idle cores). The scenes are
    still sampled in order here, and the batches, the generator state a checkpoint stores and a resumed
    run's next scene are the same as with ``workers=0`` (tested). ``close()`` ends the processes.
    """

    def __init__(
        self, seed: int, rank: int, render_size: int, crop: int, crops_per_image: int, workers: int = 0
    ):
        if crop > render_size:
            raise ValueError(f"crop={crop} is larger than render_size={render_size}")
        self.scenes = stream_rng(seed, TRAIN_STREAM, rank, 0)
        self.crops = stream_rng(seed, CROP_STREAM, rank)
        self.size, self.crop, self.per_image = render_size, crop, crops_per_image
        # spawn, not fork: the parent may hold CUDA state, which a forked child must not inherit
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers else None
        self._depth = 4 * workers  # images rendered ahead
        self._ahead: deque[Future] = deque()
        self._lookahead: np.random.Generator | None = None  # samples the scenes ahead of ``self.scenes``

    def _next_image(self) -> torch.Tensor:
        # the caption is drawn too: the scene sequence is SceneDataset's
        if self._pool is None:
            return image_to_tensor(render(captioned_scene(self.scenes)[0], self.size))
        if self._lookahead is None:
            self._lookahead = copy.deepcopy(self.scenes)
        while len(self._ahead) < self._depth:
            self._ahead.append(self._pool.submit(render, captioned_scene(self._lookahead)[0], self.size))
        # ``self.scenes`` stays at the consumed scene (sampling is cheap, drawing is not): what state() saves
        captioned_scene(self.scenes)
        return image_to_tensor(self._ahead.popleft().result())

    def next_batch(self, n: int) -> torch.Tensor:
        """(n, 3, crop, crop) in [-1, 1]."""
        out = []
        while len(out) < n:
            image = self._next_image()
            for _ in range(min(self.per_image, n - len(out))):
                y, x = self.crops.integers(0, self.size - self.crop + 1, size=2)
                out.append(image[:, y : y + self.crop, x : x + self.crop])
        return torch.stack(out)

    def state(self) -> dict[str, Any]:
        return {"scenes": self.scenes.bit_generator.state, "crops": self.crops.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.scenes.bit_generator.state = state["scenes"]
        self.crops.bit_generator.state = state["crops"]
        for fut in self._ahead:  # drawn for the old position
            fut.cancel()
        self._ahead.clear()
        self._lookahead = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._ahead.clear()


def caption_variant(scene: Scene, rng: np.random.Generator) -> str:
    """A fresh true caption of the scene: the dataset's optional parts re-drawn, and for a pair or a
    triple the phrase order shuffled ("A to the left of B" <-> "B to the right of A").

    The evaluation prompts name pairs in both orders; showing the model both teaches it that order
    carries no meaning except through the relation word.
    """
    d = scene.description
    if len(d.phrases) > 1 and rng.random() < 0.5:
        if d.relation is not None:
            d = replace(d, phrases=d.phrases[::-1], relation=_MIRROR[d.relation])
        else:
            order = rng.permutation(len(d.phrases))
            d = replace(d, phrases=tuple(d.phrases[i] for i in order))
    return caption(replace(scene, description=d), rng)


class TokenData:
    """Batches of (tokens (B, L), residuals (B, L, C), captions) from pre-tokenized arrays."""

    def __init__(
        self,
        tokens: torch.Tensor,
        residuals: torch.Tensor,
        scenes: list[Scene],
        seed: int,
        rank: int,
        world: int,
    ):
        self.tokens, self.residuals, self.scenes = tokens, residuals, scenes
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.pos = 0, 0
        self.captions = stream_rng(seed, CAPTION_STREAM, rank)
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        order = stream_rng(self.seed, ORDER_STREAM, self.epoch).permutation(len(self.tokens))
        return order[self.rank :: self.world]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = []
        while len(idx) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order()
            take = self._order[self.pos : self.pos + n - len(idx)]
            idx.extend(take.tolist())
            self.pos += len(take)
        texts = [caption_variant(self.scenes[i], self.captions) for i in idx]
        return self.tokens[idx].long(), self.residuals[idx].float(), texts

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "captions": self.captions.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.captions.bit_generator.state = state["captions"]
        self._order = self._epoch_order()
