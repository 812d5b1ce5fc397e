"""Pre-tokenize a fixed set of training scenes once, for generator training.

The tokenizer's encoder and codebook are frozen after stage 2, so their ids and residuals never change
again: rendering and encoding every scene once (instead of at every generator step) is what makes
generator training affordable on a CPU. Scenes come in shards, each drawn from its own stream
(``stream_rng(seed, PRETOKENIZE_STREAM, shard)``) and written atomically, so an interrupted run redoes only
the missing shards and ranks of a torchrun split the shards between them.

Each shard holds ids (n, L) int16, residuals (n, L, C) float16 and the scenes (their captions are re-drawn
at training time). ``meta.json`` records the residual standard deviation, from which the generator's
``vae_scale`` is set (the official 0.107 is the std of its own tokenizer's residuals), and ``seconds``, the
encoding time of all shards (each shard keeps its own, so a run resumed across sessions counts them all).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dcar.model.tokenizer import DCHT
from dcar.training import distributed as dist_utils
from dcar.training.dataset import image_to_tensor, stream_rng
from dcar.training.distributed import Dist
from dcar.training.render import render
from dcar.training.scenes import Scene, sample_scene, scene_from_dict, scene_to_dict

PRETOKENIZE_STREAM = 5
META = "meta.json"


def _shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.pt"


@torch.no_grad()
def encode_shard(tok: DCHT, seed: int, index: int, count: int, size: int, batch: int = 32) -> dict[str, Any]:
    """Draw ``count`` scenes of shard ``index``, render at ``size`` and encode them (fp32, eval mode)."""
    t0 = time.monotonic()
    rng = stream_rng(seed, PRETOKENIZE_STREAM, index)
    scenes = [sample_scene(rng) for _ in range(count)]
    dev = next(tok.parameters()).device
    ids, res = [], []
    for start in range(0, count, batch):
        x = torch.stack([image_to_tensor(render(s, size)) for s in scenes[start : start + batch]])
        q = tok.encode(x.to(dev, memory_format=torch.channels_last))
        ids.append(q.tokens.to(torch.int16).cpu())
        res.append(q.residual.to(torch.float16).cpu())
    return {
        "tokens": torch.cat(ids),
        "residuals": torch.cat(res),
        "scenes": [scene_to_dict(s) for s in scenes],
        "seconds": time.monotonic()
        - t0,  # summed into meta.json: a resumed run's cost includes earlier sessions
    }


def pretokenize(
    tok: DCHT,
    out_dir: str | Path,
    num_images: int,
    size: int,
    shard_size: int,
    seed: int,
    d: Dist,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write the missing shards (this rank's share), then ``meta.json`` on rank 0; returns the meta."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if (root / META).is_file():
        return json.loads((root / META).read_text())
    if size % tok.compression:
        raise ValueError(f"image size {size} is not a multiple of the tokenizer's {tok.compression}")
    tok.eval()
    shards = -(-num_images // shard_size)
    mine = [i for i in range(d.rank, shards, d.world) if not _shard_path(root, i).is_file()]
    for i in tqdm(mine, desc="pretokenize", disable=not (d.main and show_progress), dynamic_ncols=True):
        count = min(shard_size, num_images - i * shard_size)
        shard = encode_shard(tok, seed, i, count, size)
        tmp = _shard_path(root, i).with_suffix(".tmp")
        torch.save(shard, tmp)
        os.replace(tmp, _shard_path(root, i))
    dist_utils.barrier()
    meta: dict[str, Any] = {}
    if d.main:
        _, residuals, _, seconds = _read_shards(root, shards)
        r = residuals.float()
        grid = size // tok.compression
        meta = {
            "num_images": num_images,
            "size": size,
            "grid": [grid, grid],
            "shards": shards,
            "seed": seed,
            "codebook_size": tok.cfg.codebook_size,
            "residual_std": float(r.std()),
            # every shard's encoding time, whichever session and rank wrote it, over the ranks that share
            # the work; unknown (null) when a shard from before shards kept their time is among them
            "seconds": None if None in seconds else sum(seconds) / d.world,
            "residual_channel_std": [float(v) for v in r.flatten(0, 1).std(0)],
        }
        (root / META).write_text(json.dumps(meta, indent=1) + "\n")
    dist_utils.barrier()
    return json.loads((root / META).read_text())


def _read_shards(
    root: Path, shards: int
) -> tuple[torch.Tensor, torch.Tensor, list[dict], list[float | None]]:
    ids, res, scenes, seconds = [], [], [], []
    for i in range(shards):
        shard = torch.load(_shard_path(root, i), weights_only=False)
        ids.append(shard["tokens"])
        res.append(shard["residuals"])
        scenes.extend(shard["scenes"])
        seconds.append(shard.get("seconds"))
    return torch.cat(ids), torch.cat(res), scenes, seconds


def load_pretokenized(out_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[Scene], dict[str, Any]]:
    """(ids (N, L) int16, residuals (N, L, C) float16, scenes, meta) of a finished pre-tokenized set."""
    root = Path(out_dir)
    meta = json.loads((root / META).read_text())
    ids, res, scenes, _ = _read_shards(root, meta["shards"])
    return ids, res, [scene_from_dict(s) for s in scenes], meta
