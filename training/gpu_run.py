"""One bounded training run for a lent GPU: the embedded model's generator trained for a wall-clock budget.

A GPU host here runs one command of at most ~9 minutes, and brings back at most 8 files of 16 MiB each.
``dcar train gpu-run --out "$OUT"`` is made for that:

1. the tokenizer (encoder and codebook) is taken from a weights directory, the embedded model's by default
   (every decoder refined from it keeps the same token ids, so the new generator pairs with any of them),
   or, with ``tokenizer_minutes``, the preset's tokenizer is trained from scratch first: the embedded
   tokenizer's ceiling (0.82 continuous, 0.65 codewords) caps any generator under the 0.80 target;
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

import hashlib
import io
import json
import re
import shutil
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a run starts: ``dcar train --help`` reads the defaults below
    from dcar.training.distributed import Dist
    from dcar.training.presets import TokenizerRecipe, TrainPreset
    from dcar.training.runlog import RunOptions

PART_BYTES = 15 * 2**20  # under the 16 MiB a GPU host returns per file
MAX_PARTS = 6  # with report.md and report.json: within the 8 files that come back
PARTS_GLOB = "run-*.tar.*"
# run-<first 16 hex of the tar's sha256>.tar.<index>-of-<count>: the parts check themselves on the way back
PART_NAME = re.compile(r"run-([0-9a-f]{16})\.tar\.(\d{2})-of-(\d{2})")


@dataclass(frozen=True)
class GpuRunConfig:
    """What a bounded run trains and how long it may take."""

    weights: Path  # the tokenizer's source (a weights directory), unless one is trained first
    minutes: float = 8.0  # the whole command: [tokenizer,] pre-tokenizing, probe, training, export, packing
    # > 0: the preset's tokenizer recipe trained from scratch first, within this many of the minutes (its
    # three stages scaled by one factor to what a probe of each stage says fits); 0: ``weights``' tokenizer
    tokenizer_minutes: float = 0.0
    scenes: int = 50_000
    batch: int = 256
    lr: float | None = None  # default: the preset's
    probe_steps: int = 30
    reserve_s: float = 30.0  # kept for what follows training: last samples, export, packing
    max_steps: int | None = None
    draw_workers: int = 0
    seed: int = 0


def _later_median(secs: list[float]) -> float:
    """Median of a probe's later steps (the first ones include warm-up and autotuning)."""
    return statistics.median(secs[len(secs) // 2 :])


def _step_seconds(run_dir: Path) -> float:
    from dcar.training.runlog import read_csv

    return _later_median([row["sec"] for row in read_csv(run_dir / "losses.csv")])


def steps_for(seconds_left: float, step_s: float, max_steps: int | None = None) -> int:
    """Steps that fit ``seconds_left`` at ``step_s`` each with 10% to spare (logging, EMA and the last
    checkpoint are not in the probe's median: measured on a CPU, 182 of 190 steps fitted with 5%), in
    hundreds once there are many."""
    steps = int(seconds_left / (1.10 * step_s))
    if steps >= 1000:
        steps -= steps % 100
    return max(1, min(steps, max_steps or steps))


def _stage_seconds(run_dir: Path) -> tuple[float, float, float]:
    """``_later_median`` seconds a step of each tokenizer stage in a probe run (0 for a stage it did not
    run). The later steps of stage 3 include the discriminator's, the dearest of the recipe."""
    from dcar.training.runlog import read_csv

    rows = read_csv(run_dir / "losses.csv")
    medians = []
    for stage in (1, 2, 3):
        secs = [row["sec"] for row in rows if int(row["stage"]) == stage]
        medians.append(_later_median(secs) if secs else 0.0)
    return medians[0], medians[1], medians[2]


def scaled_recipe(
    recipe: TokenizerRecipe, stage_s: tuple[float, float, float], seconds: float
) -> TokenizerRecipe:
    """The recipe with its stage steps scaled by one factor (up or down) to take ``seconds`` at ``stage_s`` a
    step, with 10% to spare, as ``steps_for``; a stage the recipe skips stays skipped, any other keeps a
    step. Scaled down, the warm-up and the dead-code restart interval shrink alike (a run of 20 steps
    would never leave a warm-up of 100); scaled up they stay."""
    planned = sum(n * s for n, s in zip(recipe.stage_steps, stage_s))
    factor = max(0.0, seconds) / (1.10 * planned) if planned > 0 else 1.0
    a, b, c = (max(1, int(n * factor)) if n else 0 for n in recipe.stage_steps)
    shrink = min(1.0, factor)
    return replace(
        recipe,
        stage_steps=(a, b, c),
        warmup=max(1, int(recipe.warmup * shrink)),
        restart_every=max(1, int(recipe.restart_every * shrink)) if recipe.restart_every else 0,
    )


def _train_tokenizer(
    preset: TrainPreset, cfg: GpuRunConfig, work: Path, out: Path, opts: RunOptions, d: Dist, report: dict
) -> tuple[Path, TrainPreset]:
    """The preset's tokenizer from scratch within ``cfg.tokenizer_minutes``: a probe of ``probe_steps`` in
    each stage, then the recipe scaled to the rest. Returns the run to use and the preset it trained by.

    The probe runs all three stages, so it is the tokenizer when the rest of the time buys no more steps
    than it took, or when the deadline stops the longer run before stage 2 seeded its codebook (ids of a
    random codebook would be worthless); a longer run stopped later is used as it stands. A probe the
    deadline stops is refused. No ceiling on the GPU host: ``dcar eval W --tokenizer-ceiling`` afterwards.
    """
    from dcar.training.lineage import run_seconds
    from dcar.training.runlog import mark_done
    from dcar.training.train_tokenizer import train_tokenizer

    start = time.monotonic()
    until = start + 60 * cfg.tokenizer_minutes
    recipe = replace(preset.tokenizer, init_from="", ceiling_seeds=())
    probe_recipe = replace(recipe, stage_steps=tuple(cfg.probe_steps if n else 0 for n in recipe.stage_steps))
    probe_run, probe = work / "tokenizer-probe", replace(preset, tokenizer=probe_recipe)
    if "stopped_at" in train_tokenizer(probe, probe_run, d, replace(opts, stop_by=until)):
        raise ValueError(
            f"--tokenizer-minutes {cfg.tokenizer_minutes:g}: the tokenizer's probe ({cfg.probe_steps} steps a "
            "stage) did not finish within it; give it more minutes or fewer --probe-steps"
        )
    stage_s = _stage_seconds(probe_run)
    final = replace(preset, tokenizer=scaled_recipe(recipe, stage_s, until - time.monotonic()))
    steps = final.tokenizer.stage_steps
    report["phases_seconds"]["tokenizer probe"] = time.monotonic() - start
    tok = report["tokenizer"] = {"probe_stage_seconds": list(stage_s), "stage_steps": list(steps)}
    run, used = probe_run, probe
    if sum(steps) <= probe_recipe.total_steps:
        tok.update(steps_done=probe_recipe.total_steps, status="the probe is the tokenizer: no time for more")
    else:
        report["status"] = "training the tokenizer"
        _write_report(out, report)
        t = time.monotonic()
        summary = train_tokenizer(final, work / "tokenizer", d, replace(opts, stop_by=until))
        report["phases_seconds"]["tokenizer"] = time.monotonic() - t
        done = summary.get("stopped_at", final.tokenizer.total_steps)
        stopped = "stopped_at" in summary
        if not stopped or done > steps[0]:  # finished, or past stage 1: the codebook was seeded and trained
            status = f"stopped by the deadline at step {done}" if stopped else "finished"
            tok.update(steps_done=done, status=status)
            run, used = work / "tokenizer", final
            if stopped:  # final here: the generator trainer takes only a run marked done (its time kept)
                mark_done(run, {"stopped_at": done, "used_as_it_stands": True, "seconds": run_seconds(run)})
        else:
            tok.update(
                steps_done=probe_recipe.total_steps,
                status=f"stopped by the deadline in stage 1 (step {done}): the probe is the tokenizer",
            )
    report["status"] = "pre-tokenizing"
    _write_report(out, report)
    return run, used


def gpu_run(preset: TrainPreset, cfg: GpuRunConfig, work: Path, out: Path, d: Dist) -> dict[str, Any]:
    """Train, export and pack within ``cfg.minutes``; the parts and the report land in ``out``."""
    from dcar.training.export import export
    from dcar.training.runlog import RunOptions, default_precision
    from dcar.training.train_generator import train_generator

    start = time.monotonic()
    deadline = start + 60 * cfg.minutes
    out.mkdir(parents=True, exist_ok=True)
    data, probe, run, weights = work / "tokens", work / "probe", work / "generator", work / "weights"
    # A bounded run starts over: its scenes follow --scenes/--seed/--weights, its steps this host's speed.
    stale = (data, probe, run, weights, work / "tokenizer-probe", work / "tokenizer")
    for path in stale:  # only what this run writes: --work may hold other things
        shutil.rmtree(path, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
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
    report: dict[str, Any] = {
        "status": "training the tokenizer" if cfg.tokenizer_minutes else "pre-tokenizing",
        "preset": preset.name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
        "device": str(d.device),
        "precision": opts.precision,
        "phases_seconds": {},
    }
    phases = report["phases_seconds"]
    tokenizer, tokenizer_run = cfg.weights, None
    if cfg.tokenizer_minutes:  # the preset then records the tokenizer's steps as they ran (training.json)
        tokenizer_run, preset = _train_tokenizer(preset, cfg, work, out, opts, d, report)
        tokenizer = tokenizer_run

    # Time the recipe's steps (a long schedule: no cosine decay within the probe), and export the probe
    # to learn what the packed weights will weigh before the budget is spent on training.
    probe_preset = replace(preset, generator=replace(gen, steps=10**6))
    t = time.monotonic()
    train_generator(probe_preset, tokenizer, data, probe, d, replace(opts, stop_at=cfg.probe_steps))
    phases["pre-tokenizing and probe"] = time.monotonic() - t
    size = sum(f.stat().st_size for f in export(probe_preset, tokenizer, probe, weights).rglob("*"))
    _check_returnable(size + 2**20, "the exported weights with 1 MiB of logs")
    shutil.rmtree(weights)
    step_s = _step_seconds(probe)
    train_until = deadline - cfg.reserve_s
    steps = steps_for(train_until - time.monotonic(), step_s, cfg.max_steps)
    report.update(
        status="training",
        pretokenize_seconds=json.loads((probe / "data_meta.json").read_text()).get("seconds"),
        probe_step_seconds=step_s,
        steps=steps,
    )
    _write_report(out, report)  # what comes back should the host stop the command

    t = time.monotonic()
    final = replace(preset, generator=replace(gen, steps=steps))
    # the schedule is sized to the budget; the deadline only catches a slower run than the probe said
    summary = train_generator(final, tokenizer, data, run, d, replace(opts, stop_by=train_until))
    phases["training"] = time.monotonic() - t
    done = summary.get("stopped_at", summary.get("steps", 0))

    t = time.monotonic()
    export(final, tokenizer, run, weights, name=f"dcar-{preset.name}")
    phases["export"] = time.monotonic() - t
    report.update(
        status="finished" if done == steps else f"stopped by the deadline at step {done} of {steps}",
        steps_done=done,
        images_seen=done * cfg.batch,
        summary=summary,
        last_losses=_last_losses(run),
        quick_eval=_last_quick_eval(run),
    )
    t = time.monotonic()
    parts = pack(weights, run, out, tokenizer_run)
    phases["packing"] = time.monotonic() - t
    report.update(total_seconds=time.monotonic() - start, parts=[p.name for p in parts])
    _write_report(out, report)
    return report


def _check_returnable(size: int, what: str) -> None:
    if size > MAX_PARTS * PART_BYTES:
        raise ValueError(
            f"{what}: {size / 2**20:.1f} MiB, more than {MAX_PARTS} parts of {PART_BYTES / 2**20:g} MiB, "
            "which a GPU host does not return"
        )


def _write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(format_report(report))


def _last_losses(run: Path, n: int = 100) -> dict[str, float]:
    """Means of the last ``n`` logged steps: loss, ce, diffusion, masked accuracy."""
    from dcar.training.runlog import read_csv

    rows = read_csv(run / "losses.csv")[-n:]
    keys = [k for k in ("loss", "ce", "diffusion", "acc_masked") if rows and k in rows[0]]
    return {k: statistics.fmean(r[k] for r in rows) for k in keys}


def _last_quick_eval(run: Path) -> float | None:
    from dcar.training.runlog import read_csv

    rows = read_csv(run / "val.csv") if (run / "val.csv").is_file() else []
    return rows[-1]["quick_eval"] if rows else None


def pack(weights: Path, run: Path, out: Path, tokenizer_run: Path | None = None) -> list[Path]:
    """The weights directory and the runs' logs (the generator's, and the tokenizer's when it trained here,
    under ``run/tokenizer/``) as one tar, cut into ``PART_BYTES`` parts in ``out``."""
    buf = io.BytesIO()  # in memory, not in ``out``: only the parts come back
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(weights, arcname="weights")
        logs = [(run, "run")] + ([(tokenizer_run, "run/tokenizer")] if tokenizer_run else [])
        for src, arc in logs:
            for name in ("losses.csv", "val.csv", "data_meta.json", "done"):
                if (src / name).is_file():
                    tar.add(src / name, arcname=f"{arc}/{name}")
            samples = sorted((src / "samples").glob("*.png"))
            if samples:
                tar.add(samples[-1], arcname=f"{arc}/{samples[-1].name}")
    data = buf.getvalue()
    _check_returnable(len(data), "the packed run")
    for stale in out.glob(PARTS_GLOB):  # an earlier run's: unpack would join them to these
        stale.unlink()
    digest, count = hashlib.sha256(data).hexdigest()[:16], -(-len(data) // PART_BYTES)
    parts = []
    for i in range(count):
        part = out / f"run-{digest}.tar.{i:02d}-of-{count:02d}"
        part.write_bytes(data[i * PART_BYTES : (i + 1) * PART_BYTES])
        parts.append(part)
    return parts


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The members, refusing what could write outside the folder (tarfile's "data" filter needs 3.10.12+)."""
    members = tar.getmembers()
    for m in members:
        if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"refusing the packed run's member {m.name!r}: not a plain file inside it")
    return members


def _joined_parts(parts_dir: Path) -> bytes:
    """The packed run's bytes: every part of one run present, in order, and the checksum right."""
    named = [(PART_NAME.fullmatch(p.name), p) for p in sorted(parts_dir.glob(PARTS_GLOB))]
    parts = [(m, p) for m, p in named if m]
    if not parts:
        raise FileNotFoundError(f"{parts_dir}: no parts (run-<checksum>.tar.NN-of-MM)")
    runs = {(m.group(1), m.group(3)) for m, _ in parts}
    if len(runs) > 1:
        raise ValueError(f"{parts_dir}: parts of {len(runs)} different runs; keep one run's parts")
    digest, count = runs.pop()
    have = [int(m.group(2)) for m, _ in parts]
    if have != list(range(int(count))):
        missing = sorted(set(range(int(count))) - set(have))
        raise ValueError(f"{parts_dir}: part(s) {', '.join(map(str, missing))} of {int(count)} missing")
    data = b"".join(p.read_bytes() for _, p in parts)
    if hashlib.sha256(data).hexdigest()[:16] != digest:
        raise ValueError(f"{parts_dir}: the parts do not make the packed run (checksum differs: a part cut?)")
    return data


def unpack(parts_dir: Path, out: Path) -> Path:
    """Rebuild the weights directory (and ``out/gpu-run/``: the run's logs) from ``pack``'s parts.

    Over an evaluated weights directory its card files move to ``out/previous`` first, as an export's do;
    card files of an unevaluated one are removed (they would describe other weights).
    """
    from dcar.training.export import CARD_FILES, keep_previous

    data = _joined_parts(parts_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging:
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+: both
                tar.extractall(staging, members=_safe_members(tar), **safe)
        except tarfile.TarError as e:
            raise ValueError(f"{parts_dir}: the packed run is not a readable tar: {e}") from None
        unpacked = Path(staging)
        if not (unpacked / "weights" / "model_index.json").is_file():
            raise ValueError(f"{parts_dir}: the packed run holds no weights directory")
        out.mkdir(exist_ok=True)
        keep_previous(out)
        for name in CARD_FILES:
            (out / name).unlink(missing_ok=True)
        for item in (unpacked / "weights").iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(item), str(target))
        shutil.rmtree(out / "gpu-run", ignore_errors=True)
        if (unpacked / "run").is_dir():
            shutil.move(str(unpacked / "run"), str(out / "gpu-run"))
    (out / "gpu-run").mkdir(exist_ok=True)
    for report in ("report.md", "report.json"):
        if (parts_dir / report).is_file():
            shutil.copy(parts_dir / report, out / "gpu-run" / report)
    return out


def format_report(r: dict[str, Any]) -> str:
    """report.md: what ran where, each phase's seconds, the steps and the last losses (so far)."""
    c = r["config"]
    pre = r.get("pretokenize_seconds")
    tok = r.get("tokenizer")
    source = "trained here" if tok else f"from {c['weights']}"
    lines = [
        f"# dcar train gpu-run: {r['preset']} on {r['device']} ({r['precision']}): {r['status']}",
        "",
        f"- tokenizer {source}; {c['scenes']} scenes; batch {c['batch']}; seed {c['seed']}",
    ]
    if tok:
        per_stage = " / ".join(f"{s:.4f}" for s in tok["probe_stage_seconds"])
        lines.append(
            f"- tokenizer probe: {per_stage} s a step in stages 1 / 2 / 3 -> stage steps "
            f"{' / '.join(map(str, tok['stage_steps']))} within {c['tokenizer_minutes']:g} min"
            + (f"; {tok['status']} ({tok['steps_done']} steps)" if "status" in tok else "")
        )
    lines.append(f"- pre-tokenizing {'unknown' if pre is None else f'{pre:.1f} s'}")
    if "steps" in r:
        lines.append(
            f"- probe: {r['probe_step_seconds']:.4f} s a step -> {r['steps']} steps planned within "
            f"{c['minutes']:g} min"
        )
    if "steps_done" in r:
        lines.append(f"- trained {r['steps_done']} steps ({r['images_seen']} images)")
    if "total_seconds" in r:
        lines.append(f"- total {r['total_seconds']:.1f} s")
    lines += ["", "| phase | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["phases_seconds"].items()]
    if r.get("last_losses"):
        lines += ["", "| last 100 steps | mean |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["last_losses"].items()]
    if r.get("quick_eval") is not None:
        lines += ["", f"Monitoring prompts passed at the last step: {r['quick_eval']:.3f}"]
    if r.get("parts"):
        lines += ["", f"Parts: {', '.join(r['parts'])}"]
    return "\n".join(lines) + "\n"
