"""What a run started from (``init_from``) and what that cost, so that a model's training.json states the
wall time of its whole lineage (what ``make train-tiny-v2`` costs, not only its last run).

A run records its source when it starts, in ``lineage.json``: the source's absolute path, its training
seconds and its pre-tokenized datasets as they were then. Reading the source at export time instead would
count twice once an export overwrites the source weights directory (its training.json then holds the new
totals), and would lose the source when it moved or the export runs from another directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dcar.training.runlog import CHECKPOINT, DONE, load_checkpoint

LINEAGE = "lineage.json"
TRAINING_JSON = "training.json"  # a weights directory's record of how it was made (training/export.py)
DATA_META = "data_meta.json"  # a generator run's copy of its pre-tokenized dataset's meta.json


def total(*seconds: float | None) -> float | None:
    """A sum that stays unknown when a part is: a total missing its base would pass for the whole."""
    return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)


def data_metas(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / DATA_META
    return [json.loads(path.read_text())] if path.is_file() else []


def unique_datasets(metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each dataset once: runs of one lineage may train on the same pre-tokenized scenes."""
    return list({json.dumps(m, sort_keys=True): m for m in metas}.values())


def pretokenize_seconds(metas: list[dict[str, Any]]) -> float | None:
    datasets = unique_datasets(metas)
    # "seconds_last_session": metas written before shards kept their time (one session's time only)
    return total(*(m.get("seconds", m.get("seconds_last_session")) for m in datasets)) if datasets else None


def run_seconds(run_dir: Path) -> float | None:
    """A run's training seconds: its ``done`` summary, or an unfinished run's checkpoint."""
    done = run_dir / DONE
    if done.is_file():
        return json.loads(done.read_text()).get("seconds")
    ckpt = load_checkpoint(run_dir)
    return ckpt.get("elapsed") if ckpt is not None else None


def source_record(source: Path, part: str) -> dict[str, Any]:
    """What ``source`` (a weights directory or a run) cost for ``part`` ("tokenizer" or "generator"):
    {"source": absolute path, "seconds": training seconds of its lineage, "datasets": its datasets' metas}."""
    src = source.resolve()
    if (src / TRAINING_JSON).is_file():
        rec = json.loads((src / TRAINING_JSON).read_text())
        # records from before "datasets" name the weights directory's pre-tokenizing as one dataset
        datasets = rec.get("datasets") or [{"weights": str(src), "seconds": rec.get("pretokenize_seconds")}]
        return {"source": str(src), "seconds": rec.get(f"{part}_seconds"), "datasets": datasets}
    if not (src / DONE).is_file() and not (src / CHECKPOINT).is_file():
        return {"source": str(src), "seconds": None, "datasets": []}  # gone: unknown, not zero
    before = read_lineage(src, part)
    own = run_seconds(src)
    return {
        "source": str(src),
        "seconds": own if before is None else total(own, before["seconds"]),
        "datasets": data_metas(src) + (before["datasets"] if before is not None else []),
    }


def write_lineage(run_dir: Path, part: str, init_from: str) -> None:
    """At a run's start (rank 0): record what it starts from; a resumed run keeps its first record."""
    path = run_dir / LINEAGE
    if path.is_file():
        return
    record = source_record(Path(init_from), part) if init_from else {"source": None}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def read_lineage(run_dir: Path, part: str) -> dict[str, Any] | None:
    """The run's source record; None for a run trained from scratch."""
    path = run_dir / LINEAGE
    if path.is_file():
        record = json.loads(path.read_text())
        return record if record.get("source") else None
    # a run from before lineage.json: its recipe's init_from, resolved now (relative to this directory)
    ckpt = load_checkpoint(run_dir) or {}
    source = ckpt.get("preset", {}).get(part, {}).get("init_from") or ""
    return source_record(Path(source), part) if source else None
