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

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dcar.model.tokenizer import DCHT
from dcar.training import distributed as dist_utils
from dcar.training.dataset import stream_rng
from dcar.training.distributed import Dist
from dcar.training.render import render
from dcar.training.runlog import interrupted
from dcar.training.scenes import Scene, sample_scene, scene_from_dict, scene_to_dict

PRETOKENIZE_STREAM = 5
META = "meta.json"
# What the shards are drawn and encoded by, written before the first shard: a run resumed with other
# flags or another tokenizer would otherwise add shards of other scenes or other ids to the same set.
PLAN = "plan.json"


class DataMismatch(ValueError):
    """A pre-tokenized directory holds (or was started with) other scenes or another tokenizer's ids."""


def tokens_fingerprint(tok: DCHT) -> str:
    """A digest of what the ids and residuals depend on, the encoder and the codebook (every tensor but the
    decoder's, as export.check_same_tokens compares them): a refined decoder keeps it."""
    h = hashlib.sha256()
    for key, value in sorted(tok.state_dict().items()):
        if not key.startswith("decoder."):
            h.update(key.encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_plan(root: Path, found: dict[str, Any], want: dict[str, Any], source: str) -> None:
    """Raise ``DataMismatch`` where ``found`` (a plan or a meta.json) records another value than ``want``;
    keys it lacks (a meta.json from before they were recorded) are not compared."""
    names = {"tokenizer": "tokenizer (encoder and codebook digest)"}
    changes = [
        f"{names.get(k, k)} {found[k]} (this run: {want[k]})"
        for k in want
        if k in found and found[k] != want[k]
    ]
    if changes:
        raise DataMismatch(
            f"{root} holds scenes pre-tokenized otherwise ({source}): {'; '.join(changes)}. Give another "
            "--data directory for this run, or delete this one to pre-tokenize it again"
        )


def _shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.pt"


def draw_shard(seed: int, index: int, count: int, size: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The ``count`` scenes of shard ``index`` (as dicts) and their renderings, (count, size, size, 3) uint8.

    Pure CPU work with no torch state, so a process pool can draw shards while the tokenizer encodes.
    """
    rng = stream_rng(seed, PRETOKENIZE_STREAM, index)
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([np.asarray(render(s, size).convert("RGB")) for s in scenes])
    return [scene_to_dict(s) for s in scenes], images


@torch.no_grad()
def encode_images(tok: DCHT, images: np.ndarray, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (n, L) int16 and residuals (n, L, C) float16 of uint8 renderings (fp32, eval mode)."""
    dev = next(tok.parameters()).device
    ids, res = [], []
    for start in range(0, len(images), batch):
        # image_to_tensor's [-1, 1] bit for bit: on the CPU (CUDA divides by a scalar via its reciprocal)
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        q = tok.encode(x.to(dev, memory_format=torch.channels_last))
        ids.append(q.tokens.to(torch.int16).cpu())
        res.append(q.residual.to(torch.float16).cpu())
    return torch.cat(ids), torch.cat(res)


def _shard(tok: DCHT, drawn: tuple[list[dict[str, Any]], np.ndarray], batch: int = 32) -> dict[str, Any]:
    ids, res = encode_images(tok, drawn[1], batch)
    return {"tokens": ids, "residuals": res, "scenes": drawn[0]}


def _drawn_shards(
    jobs: list[tuple[int, int]], seed: int, size: int, workers: int
) -> Iterator[tuple[list[dict[str, Any]], np.ndarray]]:
    """Shards ``[(index, count), ...]`` drawn in order: here, or by ``workers`` processes a few ahead."""
    if workers <= 0:
        yield from (draw_shard(seed, i, n, size) for i, n in jobs)
        return
    # spawn, not fork: the parent may hold CUDA state, which a forked child must not inherit
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: deque[Future] = deque()
        for i, n in jobs:
            pending.append(pool.submit(draw_shard, seed, i, n, size))
            if len(pending) > 2 * workers:  # bound the renderings held in memory
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early (an error while encoding): drop what is still queued
        pool.shutdown(wait=True, cancel_futures=True)


def pretokenize(
    tok: DCHT,
    out_dir: str | Path,
    num_images: int,
    size: int,
    shard_size: int,
    seed: int,
    d: Dist,
    show_progress: bool = True,
    workers: int = 0,
) -> dict[str, Any]:
    """Write the missing shards (this rank's share), then ``meta.json`` on rank 0; returns the meta.

    ``workers`` > 0 draws the scenes in that many processes while this one encodes (a GPU host's idle
    cores); the shards are the same either way.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    shards = -(-num_images // shard_size)
    plan = {
        "num_images": num_images,
        "size": size,
        "shard_size": shard_size,
        "shards": shards,
        "seed": seed,
        "codebook_size": tok.cfg.codebook_size,
        "tokenizer": tokens_fingerprint(tok),
    }
    if (root / META).is_file():
        meta = json.loads((root / META).read_text())
        _check_plan(root, meta, plan, META)
        return meta
    if (root / PLAN).is_file():
        _check_plan(root, json.loads((root / PLAN).read_text()), plan, PLAN)
    if size % tok.compression:
        raise ValueError(f"image size {size} is not a multiple of the tokenizer's {tok.compression}")
    dist_utils.barrier()  # every rank has read the plan before rank 0 writes it
    if d.main and not (root / PLAN).is_file():
        (root / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    tok.eval()
    mine = [i for i in range(d.rank, shards, d.world) if not _shard_path(root, i).is_file()]
    jobs = [(i, min(shard_size, num_images - i * shard_size)) for i in mine]
    bar = tqdm(mine, desc="pretokenize", disable=not (d.main and show_progress), dynamic_ncols=True)
    last = time.monotonic()
    with closing(_drawn_shards(jobs, seed, size, workers)) as drawn:
        for i, shard_drawn in zip(bar, drawn):
            _write_shard(root, i, _shard(tok, shard_drawn), (time.monotonic() - last) / d.world)
            last = time.monotonic()
            if interrupted():  # Ctrl-C: the shards written so far stay, a rerun writes the others
                raise KeyboardInterrupt
    dist_utils.barrier()
    meta: dict[str, Any] = {}
    if d.main:
        _, residuals, _, seconds = _read_shards(root, shards)
        r = residuals.float()
        grid = size // tok.compression
        meta = {
            **plan,
            "grid": [grid, grid],
            "residual_std": float(r.std()),
            # every shard's share of the wall time, whichever session and rank wrote it; unknown (null)
            # when a shard from before shards kept their time is among them
            "seconds": None if None in seconds else sum(seconds),
            "residual_channel_std": [float(v) for v in r.flatten(0, 1).std(0)],
        }
        (root / META).write_text(json.dumps(meta, indent=1) + "\n")
    dist_utils.barrier()
    return json.loads((root / META).read_text())


def _write_shard(root: Path, index: int, shard: dict[str, Any], seconds: float) -> None:
    """Atomically, with the wall seconds it took over the ranks sharing the work (the wall time since the
    previous shard, divided by the world size): summed into meta.json, so a run resumed in another session
    counts the earlier sessions' shards too, and parallel drawing is not counted twice."""
    shard["seconds"] = seconds
    tmp = _shard_path(root, index).with_suffix(".tmp")
    torch.save(shard, tmp)
    os.replace(tmp, _shard_path(root, index))


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
