"""One bounded training run for a lent GPU: the embedded model's generator trained for a wall-clock budget.

A GPU host here runs one command of at most ~9 minutes, and brings back at most 8 files of 16 MiB each.
``dcar train gpu-run --out "$OUT"`` is made for that:

1. the tokenizer (encoder and codebook) is taken from a weights directory, the embedded model's by default:
   the generator is what caps that model (docs/training.md), and every decoder refined from it keeps the
   same token ids, so the new generator pairs with any of them;
2. ``scenes`` scenes are pre-tokenized, drawn by the host's idle cores while the GPU encodes;
3. a probe run times the generator recipe's steps (the preset's architecture at ``batch``), then a run
   from scratch takes as many steps as the rest of the budget allows, with its cosine over exactly those;
4. the EMA weights are exported, packed with the run's logs into parts of at most ``PART_BYTES``, and
   ``report.md`` states each phase's seconds, the steps, seconds a step and the last losses.

``dcar train gpu-unpack DIR --out W`` rebuilds the weights directory from the parts (over an evaluated
model, whose card then moves to ``W/previous`` for the old-vs-new card). Evaluate it on the CPU, so its
numbers come from the same machine as the committed model's. The same code runs on a CPU at toy size
(``--preset ci``): that is how the suite tests it.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a run starts: ``dcar train --help`` reads the defaults below
    from dcar.training.distributed import Dist
    from dcar.training.presets import TrainPreset

PART_BYTES = 15 * 2**20  # under the 16 MiB a GPU host returns per file
MAX_PARTS = 6  # with report.md and report.json: within the 8 files that come back
PARTS_GLOB = "run.tar.*"


@dataclass(frozen=True)
class GpuRunConfig:
    """What a bounded run trains and how long it may take."""

    weights: Path  # the tokenizer's source (a weights directory)
    minutes: float = 8.0  # the whole command: pre-tokenizing, probe, training, export, packing
    scenes: int = 50_000
    batch: int = 256
    lr: float | None = None  # default: the preset's
    probe_steps: int = 30
    reserve_s: float = 30.0  # kept for what follows training: last samples, export, packing
    max_steps: int | None = None
    draw_workers: int = 0
    seed: int = 0


def _step_seconds(run_dir: Path) -> float:
    """Median seconds of the probe's later steps (the first ones include warm-up and autotuning)."""
    with open(run_dir / "losses.csv") as f:
        secs = [float(row["sec"]) for row in csv.DictReader(f)]
    return statistics.median(secs[len(secs) // 2 :])


def steps_for(seconds_left: float, step_s: float, max_steps: int | None = None) -> int:
    """Steps that fit ``seconds_left`` at ``step_s`` each with 5% to spare, in hundreds once there are many."""
    steps = int(seconds_left / (1.05 * step_s))
    if steps >= 1000:
        steps -= steps % 100
    return max(1, min(steps, max_steps or steps))


def gpu_run(preset: TrainPreset, cfg: GpuRunConfig, work: Path, out: Path, d: Dist) -> dict[str, Any]:
    """Train, export and pack within ``cfg.minutes``; the parts and the report land in ``out``."""
    from dcar.training.export import export
    from dcar.training.runlog import RunOptions, default_precision
    from dcar.training.train_generator import train_generator

    start = time.monotonic()
    deadline = start + 60 * cfg.minutes
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    gen = replace(
        preset.generator,
        num_images=cfg.scenes,
        batch=cfg.batch,
        lr=cfg.lr or preset.generator.lr,
        init_from="",
        further=False,
    )
    opts = RunOptions(
        seed=cfg.seed,
        precision=default_precision(d.device),
        sample_minutes=1e9,  # samples at the last step only
        progress_bar=False,
        draw_workers=cfg.draw_workers,
    )
    data, probe, run = work / "tokens", work / "probe", work / "generator"
    for stale in (probe, run):  # a bounded run starts over: its step count depends on this host
        shutil.rmtree(stale, ignore_errors=True)

    # The probe's schedule is long, so its steps run at the peak learning rate like most real ones.
    probe_preset = replace(preset, generator=replace(gen, steps=10**6))
    t = time.monotonic()
    train_generator(probe_preset, cfg.weights, data, probe, d, replace(opts, stop_at=cfg.probe_steps))
    phases["pre-tokenizing and probe"] = time.monotonic() - t
    step_s = _step_seconds(probe)
    steps = steps_for(deadline - time.monotonic() - cfg.reserve_s, step_s, cfg.max_steps)

    t = time.monotonic()
    final = replace(preset, generator=replace(gen, steps=steps))
    summary = train_generator(final, cfg.weights, data, run, d, opts)
    phases["training"] = time.monotonic() - t

    t = time.monotonic()
    weights = export(final, cfg.weights, run, work / "weights", name=f"dcar-{preset.name}")
    phases["export"] = time.monotonic() - t
    report = {
        "preset": preset.name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
        "device": str(d.device),
        "precision": opts.precision,
        "pretokenize_seconds": json.loads((run / "data_meta.json").read_text()).get("seconds"),
        "probe_step_seconds": step_s,
        "steps": steps,
        "images_seen": steps * cfg.batch,
        "summary": summary,
        "last_losses": _last_losses(run),
        "quick_eval": _last_quick_eval(run),
    }
    t = time.monotonic()
    parts = pack(weights, run, out)
    phases["packing"] = time.monotonic() - t
    report["phases_seconds"] = phases
    report["total_seconds"] = time.monotonic() - start
    report["parts"] = [p.name for p in parts]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(format_report(report))
    return report


def _last_losses(run: Path, n: int = 100) -> dict[str, float]:
    """Means of the last ``n`` logged steps: loss, ce, diffusion, masked accuracy."""
    with open(run / "losses.csv") as f:
        rows = list(csv.DictReader(f))[-n:]
    keys = [k for k in ("loss", "ce", "diffusion", "acc_masked") if rows and k in rows[0]]
    return {k: statistics.fmean(float(r[k]) for r in rows) for k in keys}


def _last_quick_eval(run: Path) -> float | None:
    path = run / "val.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["quick_eval"]) if rows else None


def pack(weights: Path, run: Path, out: Path) -> list[Path]:
    """The weights directory and the run's logs as one tar, cut into ``PART_BYTES`` parts in ``out``."""
    tar_path = run.parent / "run.tar"  # beside the run, not in ``out``: only the parts come back
    with tarfile.open(tar_path, "w") as tar:
        tar.add(weights, arcname="weights")
        for name in ("losses.csv", "val.csv", "data_meta.json", "done"):
            if (run / name).is_file():
                tar.add(run / name, arcname=f"run/{name}")
        samples = sorted((run / "samples").glob("*.png"))
        if samples:
            tar.add(samples[-1], arcname=f"run/{samples[-1].name}")
    size = tar_path.stat().st_size
    if size > MAX_PARTS * PART_BYTES:
        tar_path.unlink()
        raise ValueError(
            f"the packed run is {size / 2**20:.0f} MiB; at most {MAX_PARTS} parts of 15 MiB come back"
        )
    parts = []
    with open(tar_path, "rb") as f:
        for i in range(-(-size // PART_BYTES)):
            part = out / f"run.tar.{i:02d}"
            part.write_bytes(f.read(PART_BYTES))
            parts.append(part)
    tar_path.unlink()
    return parts


def unpack(parts_dir: Path, out: Path) -> Path:
    """Rebuild the weights directory (and ``out/gpu-run/``: the run's logs) from ``pack``'s parts.

    Over an evaluated weights directory its card files move to ``out/previous`` first, as an export's do.
    """
    from dcar.training.export import keep_previous

    parts = sorted(parts_dir.glob(PARTS_GLOB))
    if not parts:
        raise FileNotFoundError(f"{parts_dir}: no {PARTS_GLOB} parts")
    tar_path = out.parent / f".{out.name}.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tar_path, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    staging = out.parent / f".{out.name}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(staging, filter="data")  # refuses absolute paths and links out of the folder
    tar_path.unlink()
    out.mkdir(exist_ok=True)
    keep_previous(out)
    for item in (staging / "weights").iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(item), str(target))
    shutil.rmtree(out / "gpu-run", ignore_errors=True)
    shutil.move(str(staging / "run"), str(out / "gpu-run"))
    for report in ("report.md", "report.json"):
        if (parts_dir / report).is_file():
            shutil.copy(parts_dir / report, out / "gpu-run" / report)
    shutil.rmtree(staging)
    return out


def format_report(r: dict[str, Any]) -> str:
    """report.md: what ran where, each phase's seconds, the steps and the last losses."""
    c = r["config"]
    lines = [
        f"# dcar train gpu-run: {r['preset']} on {r['device']} ({r['precision']})",
        "",
        f"- tokenizer from {c['weights']}; {c['scenes']} scenes; batch {c['batch']}; seed {c['seed']}",
        f"- probe: {r['probe_step_seconds']:.4f} s a step -> {r['steps']} steps "
        f"({r['images_seen']} images) within {c['minutes']:g} min",
        f"- total {r['total_seconds']:.1f} s, of which pre-tokenizing {r['pretokenize_seconds'] or 0:.1f} s",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
        *(f"| {k} | {v:.1f} |" for k, v in r["phases_seconds"].items()),
        "",
        "| last 100 steps | mean |",
        "| --- | ---: |",
        *(f"| {k} | {v:.4f} |" for k, v in r["last_losses"].items()),
    ]
    if r.get("quick_eval") is not None:
        lines += ["", f"Monitoring prompts passed at the last step: {r['quick_eval']:.3f}"]
    lines += ["", f"Parts: {', '.join(r['parts'])}", ""]
    return "\n".join(lines)
