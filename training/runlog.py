"""What every training run shares: the learning-rate schedule, checkpoints, the loss CSV, the progress bar,
sample grids and the random state that makes a resumed run repeat the next step exactly.

A run directory holds ``checkpoint.pt`` (written atomically every few minutes and at the end of each
stage), ``losses.csv`` (one row per step), ``samples/*.png`` and ``done`` once finished. Only rank 0
writes; every rank's random state travels inside the checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

CHECKPOINT = "checkpoint.pt"
DONE = "done"


@dataclass
class RunOptions:
    """How to run (not what to train): precision, checkpoint cadence, an early stop for tests."""

    seed: int = 0
    precision: str = "bf16"
    checkpoint_minutes: float = 5.0
    checkpoint_every: int = 0  # also every this many steps (0: time only)
    sample_minutes: float = 10.0
    stop_at: int | None = None  # stop (with a checkpoint) once this global step is reached
    stop_by: float | None = None  # ... or once ``time.monotonic()`` passes this (a bounded run's deadline)
    progress_bar: bool = True
    # processes drawing scenes (pre-tokenizing, tokenizer batches): a GPU host's idle cores
    draw_workers: int = 0

    def stop_due(self, step: int, device: torch.device) -> bool:
        """Whether to stop before ``step``: ``stop_at`` reached, or ``stop_by`` passed on rank 0's clock
        (every rank must take the same decision, or the next collective would hang)."""
        from dcar.training.distributed import agree

        if self.stop_at is not None and step >= self.stop_at:
            return True
        if _interrupt["asked"]:
            return True
        # without a deadline no rank can be late: no broadcast on every step
        return self.stop_by is not None and agree(time.monotonic() >= self.stop_by, device)


_interrupt = {"asked": False}


def interrupted() -> bool:
    """Whether a Ctrl-C asked the run (inside ``stop_on_ctrl_c``) to stop at the next step."""
    return _interrupt["asked"]


@contextmanager
def stop_on_ctrl_c() -> Iterator[None]:
    """The first Ctrl-C (SIGINT) stops the run before its next step, with a checkpoint, rather than losing
    the steps since the last one (up to ``checkpoint_minutes`` of work) to a KeyboardInterrupt mid-step; a
    second one interrupts at once. One process only: torchrun's ranks would not stop at the same step."""

    def ask(signum, frame):
        if _interrupt["asked"]:
            raise KeyboardInterrupt
        _interrupt["asked"] = True
        print(
            "\nstopping before the next step, with a checkpoint (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started to ignore it (as Python itself keeps it)
        yield
        return
    before = signal.signal(signal.SIGINT, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        _interrupt["asked"] = False


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (CPU with AVX-512 bf16, or CUDA) or nothing; weights and optimiser stay fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision={precision!r}; expected 'bf16' or 'fp32'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def default_precision(device: torch.device) -> str:
    """bf16 where it is fast: CUDA with bf16 support, or a CPU whose oneDNN has bf16 kernels."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


# --- random state -----------------------------------------------------------------------------------


def rng_state(torch_gen: torch.Generator, np_rng: np.random.Generator) -> dict[str, Any]:
    return {"torch": torch_gen.get_state(), "numpy": np_rng.bit_generator.state}


def load_rng_state(state: dict[str, Any], torch_gen: torch.Generator, np_rng: np.random.Generator) -> None:
    torch_gen.set_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]


# --- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``checkpoint.pt`` atomically (a crash mid-write leaves the previous one intact)."""
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class CheckpointTimer:
    """True every ``minutes`` of wall time (and every ``every_steps`` steps when that is set)."""

    def __init__(self, minutes: float, every_steps: int = 0):
        self.interval = minutes * 60.0
        self.every_steps = every_steps
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.interval > 0 and time.monotonic() - self.last >= self.interval

    def reset(self) -> None:
        self.last = time.monotonic()


class RunMismatch(ValueError):
    """The run directory's checkpoint was written by another recipe than the one asked for now: resuming
    (or skipping it as finished) would mix two runs in one, or pass one off as the other."""


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(none)"
    return repr(value) if isinstance(value, str) else str(value)


def check_resumable(
    run_dir: Path, ckpt: dict[str, Any], part: str, preset: Any, seed: int, data: dict[str, Any] | None = None
) -> None:
    """Raise ``RunMismatch`` unless ``ckpt`` was written by ``preset``'s recipe for ``part`` ("tokenizer" or
    "generator"), ``seed`` and (a generator) the pre-tokenized ``data``. Only what the checkpoint records is
    compared: checkpoints from before a field was recorded are not refused for it."""
    old = ckpt.get("preset", {})
    changes = []
    if old.get("name") not in (None, preset.name):
        changes.append(f"preset {old['name']} (now {preset.name})")
    new = preset.to_dict()[part]
    for key, was in old.get(part, {}).items():
        if key in new and _shown(was) != _shown(new[key]):
            changes.append(f"{key} {_shown(was)} (now {_shown(new[key])})")
    if ckpt.get("seed", seed) != seed:
        changes.append(f"seed {ckpt['seed']} (now {seed})")
    was_data = ckpt.get("meta") or {}
    for key in ("num_images", "size", "seed", "shards", "codebook_size", "residual_std", "tokenizer"):
        if data is not None and key in was_data and key in data and was_data[key] != data[key]:
            what = "tokenizer (encoder and codebook digest)" if key == "tokenizer" else f"data {key}"
            changes.append(f"{what} {_shown(was_data[key])} (now {_shown(data[key])})")
    if changes:
        state = "finished" if is_done(run_dir) else "its checkpoint"
        raise RunMismatch(
            f"{run_dir} ({state}) was trained with another recipe: {'; '.join(changes)}. Rerun it with the "
            "flags it started with, add --fresh to start it over, or give another --out"
        )


def mark_done(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / DONE).write_text(json.dumps(summary, indent=1) + "\n")


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


# --- logs -------------------------------------------------------------------------------------------


class CsvLog:
    """Append-only CSV; columns fixed at creation. On resume, rows after the resume step are dropped so the
    file never holds two rows for one step."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None):
        self.path = path
        self.columns = columns
        if path.is_file() and resume_step is not None:
            rows = list(csv.DictReader(path.open()))
            kept = [r for r in rows if int(r["step"]) <= resume_step]
            self._write_all(kept)
        elif not path.is_file() or resume_step is None:
            self._write_all([])

    def _write_all(self, rows: list[dict[str, str]]) -> None:
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def read_csv(path: Path) -> list[dict[str, float]]:
    out = []
    for row in csv.DictReader(path.open()):
        out.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=2.0,
        smoothing=0.05,
    )


# --- images -----------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor, signed: bool = True) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] (``signed``) or [0, 1] -> (B, H, W, 3) uint8."""
    x = images.detach().float().cpu()
    if signed:
        x = x * 0.5 + 0.5
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[torch.Tensor], path: Path, signed: bool = True, pad: int = 2) -> Path:
    """Save a grid: one list entry per row, each (B, 3, H, W); all the same size."""
    arrays = [to_uint8(r, signed) for r in rows]
    n, h, w = len(arrays[0]), arrays[0].shape[1], arrays[0].shape[2]
    grid = np.full((len(arrays) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(arrays):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
