"""The procedural training stream and the fixed evaluation split.

``SceneDataset`` is an endless ``IterableDataset`` of (image, caption, scene). Each DDP rank and each
DataLoader worker draws from its own generator, seeded by
``np.random.SeedSequence([seed, TRAIN_STREAM, rank, worker])``: the same (seed, rank, worker) always
repeats the same samples, and different ones give statistically independent streams (SeedSequence
hashes its whole entropy list, so neighbouring ranks or workers do not share or shift sequences).
The evaluation split uses ``[seed, EVAL_STREAM]``, a different stream from any training rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dcar.training.captions import caption
from dcar.training.render import render
from dcar.training.scenes import Scene, sample_scene, scene_from_dict, scene_to_dict

TRAIN_STREAM = 0
EVAL_STREAM = 1
SCENES_FILE = "scenes.jsonl"


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of one named stream: ``stream_rng(seed, TRAIN_STREAM, rank, worker)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def captioned_scene(rng: np.random.Generator) -> tuple[Scene, str]:
    """The stream's next scene and its caption, both drawn from ``rng``: every reader of a scene stream
    draws both, so the scene sequence is the same whether the caption is used or not."""
    scene = sample_scene(rng)
    return scene, caption(scene, rng)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1], the tokenizer's input range."""
    array = np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class SceneDataset(IterableDataset):
    """Endless seeded stream of ``(image (3, size, size) in [-1, 1], caption, scene)``.

    ``rank`` defaults to the torch.distributed rank (0 outside DDP); the worker id comes from the
    DataLoader. Batch with ``collate_scenes``: the default collate cannot stack Scene objects.
    """

    def __init__(self, size: int = 256, seed: int = 0, rank: int | None = None) -> None:
        super().__init__()
        if size < 16:
            raise ValueError(f"size={size}; scenes need at least 16 pixels a side")
        self.size = size
        self.seed = seed
        self.rank = rank

    def stream(self, rank: int, worker: int) -> Iterator[tuple[torch.Tensor, str, Scene]]:
        """The samples of one (rank, worker) pair, in order."""
        rng = stream_rng(self.seed, TRAIN_STREAM, rank, worker)
        while True:
            scene, text = captioned_scene(rng)
            yield image_to_tensor(render(scene, self.size)), text, scene

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, Scene]]:
        info = get_worker_info()
        rank = _current_rank() if self.rank is None else self.rank
        return self.stream(rank, 0 if info is None else info.id)


def collate_scenes(
    batch: list[tuple[torch.Tensor, str, Scene]],
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """DataLoader collate: (B, 3, H, W) images, B captions, B scenes."""
    images, texts, scenes = zip(*batch, strict=True)
    return torch.stack(images), list(texts), list(scenes)


@dataclass(frozen=True)
class EvalSample:
    """One image of the evaluation split with its caption and ground-truth scene."""

    image: Image.Image
    caption: str
    scene: Scene


def write_eval_split(out_dir: str | Path, n: int, size: int, seed: int) -> Path:
    """Write n PNGs (00000.png, ...) and scenes.jsonl (file, caption, scene per line); returns the jsonl path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = stream_rng(seed, EVAL_STREAM)
    lines = []
    for i in range(n):
        scene, text = captioned_scene(rng)
        name = f"{i:05d}.png"
        render(scene, size).save(out / name)
        lines.append(json.dumps({"file": name, "caption": text, "scene": scene_to_dict(scene)}))
    path = out / SCENES_FILE
    path.write_text("".join(line + "\n" for line in lines))
    return path


def load_eval_split(directory: str | Path) -> list[EvalSample]:
    """Read a split written by :func:`write_eval_split`, images loaded into memory."""
    root = Path(directory)
    samples = []
    for line in (root / SCENES_FILE).read_text().splitlines():
        record = json.loads(line)
        with Image.open(root / record["file"]) as image:
            samples.append(
                EvalSample(image.convert("RGB"), record["caption"], scene_from_dict(record["scene"]))
            )
    return samples
