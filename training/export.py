"""Export trained runs to a weights directory: ``Pipeline.save_pretrained`` plus ``training.json``.

The directory is the dcar layout (model_index.json, tokenizer/, generator/, text_encoder/) that
``Pipeline.from_pretrained`` loads; ``training.json`` records how it was made (recipe, wall times,
hardware) for the model card that ``dcar eval --write-card`` writes beside it. Wall times cover the whole
lineage: a run started from another (``init_from``) adds what that one cost (training/lineage.py).

The generator may come from a weights directory instead of a run: that re-exports a model with a refined
tokenizer decoder (``tiny-shapes-v2``), allowed only when the tokenizer's encoder and codebook are the ones
the generator was trained with. Exporting over an evaluated model keeps its card, results, samples and
training record in ``previous/``, so the new card shows old and new side by side.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dcar.model.config import PipelineConfig
from dcar.model.pipeline import Pipeline
from dcar.training.card_compare import PREVIOUS  # the replaced model's card files
from dcar.training.lineage import (
    TRAINING_JSON,
    data_metas,
    pretokenize_seconds,
    read_lineage,
    run_seconds,
    total,
    unique_datasets,
)
from dcar.training.presets import TrainPreset
from dcar.training.trained import is_weights_dir, load_trained_generator, load_trained_tokenizer

CARD_FILES = ("README.md", "eval.json", "samples.png", TRAINING_JSON)


class ExportError(ValueError):
    """The runs cannot make a consistent weights directory (the message says why)."""


def hardware() -> dict[str, Any]:
    """A short description of the machine the current process runs on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        # the vector ISA torch's kernels use (AVX2, AVX512, ...): CPU step times differ ~3x between them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def export(
    preset: TrainPreset,
    tokenizer_dir: str | Path,
    generator_dir: str | Path,
    out: str | Path,
    name: str | None = None,
    guidance_scale: float | None = None,
    randomize_temperature: float | None = None,
) -> Path:
    """Write the weights directory ``out`` from a tokenizer run and a generator run (EMA weights).

    ``guidance_scale`` and ``randomize_temperature`` override the preset's sampling defaults stored in
    model_index.json (what a request gets when it does not say).
    """
    tokenizer_dir, generator_dir, out = Path(tokenizer_dir), Path(generator_dir), Path(out)
    tok = load_trained_tokenizer(tokenizer_dir, preset)
    tok_before = read_lineage(tokenizer_dir, "tokenizer")
    base: Pipeline | None = None
    base_record: dict[str, Any] = {}
    if is_weights_dir(generator_dir):  # a weights directory: keep its generator
        base = Pipeline.from_pretrained(generator_dir, dtype=torch.float32)
        check_same_tokens(base.tokenizer, tok, generator_dir)
        gen, text, gcfg, sampling = (
            base.generator,
            base.text_encoder,
            base.config.generator,
            base.config.sampling,
        )
        base_path = generator_dir / TRAINING_JSON
        base_record = json.loads(base_path.read_text()) if base_path.is_file() else {}
    else:
        gen, text, gcfg = load_trained_generator(generator_dir, preset)
        check_trained_on(generator_dir, tok, tokenizer_dir)
        sampling = preset.pipeline.sampling
    gen_before = read_lineage(generator_dir, "generator") if base is None else None
    if guidance_scale is not None:
        sampling = replace(sampling, guidance_scale=guidance_scale)
    if randomize_temperature is not None:
        sampling = replace(sampling, randomize_temperature=randomize_temperature)
    config = PipelineConfig(preset.pipeline.tokenizer, gcfg, preset.pipeline.text_encoder, sampling)
    name = name or f"dcar-{preset.name}"
    pipe = Pipeline(config, tok, gen, text, name=name, device="cpu", dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    keep_previous(out)
    pipe.save_pretrained(out, name)
    # a tokenizer taken from a weights directory was trained elsewhere: its cost and hardware are that model's
    tok_from = _tokenizer_weights_record(tokenizer_dir) if is_weights_dir(tokenizer_dir) else None
    tok_own = tok_from.pop("seconds") if tok_from is not None else run_seconds(tokenizer_dir)
    gen_own = run_seconds(generator_dir)  # mid-run: so far
    datasets = data_metas(generator_dir) + (gen_before["datasets"] if gen_before is not None else [])
    record: dict[str, Any] = {
        "preset": preset.to_dict(),
        "tokenizer_seconds": tok_own,
        "generator_seconds": gen_own,
        "pretokenize_seconds": pretokenize_seconds(datasets),
        # every pre-tokenized dataset of the lineage, so that a further run from these weights on one of
        # them does not count its pre-tokenizing twice
        "datasets": unique_datasets(datasets),
        "vae_scale": gcfg.head.vae_scale,
        "parameters": {
            "tokenizer": sum(p.numel() for p in pipe.tokenizer.parameters()),
            "generator": sum(p.numel() for p in pipe.generator.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
        "hardware": hardware(),
    }
    if tok_from is not None:
        record["tokenizer_from"] = tok_from
    # Wall times are totals over the whole lineage (what ``make train-tiny`` costs); a refinement or a
    # further schedule also states its own part.
    if tok_before is not None:
        record.update(
            tokenizer_seconds=total(tok_before["seconds"], tok_own), tokenizer_refine_seconds=tok_own
        )
    if gen_before is not None:
        record.update(
            generator_seconds=total(gen_before["seconds"], gen_own), generator_further_seconds=gen_own
        )
    if base is not None:  # the generator's training happened in the base model's runs
        record.update(
            {k: base_record.get(k) for k in ("generator_seconds", "pretokenize_seconds", "datasets")},
            base={"name": base.name, "preset": base_record.get("preset")},
        )
        if base_record.get("generator_further_seconds") is not None:
            record["generator_further_seconds"] = base_record["generator_further_seconds"]
    (out / TRAINING_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _tokenizer_weights_record(weights: Path) -> dict[str, Any]:
    """Where a tokenizer taken from a weights directory was trained: its training seconds and hardware."""
    path = weights / TRAINING_JSON
    rec = json.loads(path.read_text()) if path.is_file() else {}
    if rec.get("tokenizer_from"):  # that model took its tokenizer from another: name the one that trained it
        return {**rec["tokenizer_from"], "seconds": rec.get("tokenizer_seconds")}
    return {
        "weights": str(weights.resolve()),
        "seconds": rec.get("tokenizer_seconds"),
        "hardware": rec.get("hardware"),
    }


def check_same_tokens(base: torch.nn.Module, tok: torch.nn.Module, source: Path) -> None:
    """Raise ExportError unless ``tok`` differs from ``base`` in its decoder only: the generator predicts
    token ids and residuals of ``base``'s encoder and codebook."""
    a, b = base.state_dict(), tok.state_dict()
    if a.keys() != b.keys():
        raise ExportError(f"the tokenizer's architecture differs from {source}'s")
    changed = sorted(
        k for k in a if not k.startswith("decoder.") and not torch.equal(a[k].float(), b[k].float())
    )
    if changed:
        raise ExportError(
            f"the tokenizer's encoder or codebook differ from those {source}'s generator was trained with "
            f"({len(changed)} tensors, e.g. {changed[0]}): its token ids would mean other codewords; refine the "
            "decoder only (stage_steps 0,0,N) or train a generator for this tokenizer"
        )


def check_trained_on(run_dir: Path, tok: torch.nn.Module, source: Path) -> None:
    """Raise ExportError unless ``tok`` encodes the ids generator run ``run_dir`` was trained on (its
    pre-tokenized data record the encoder and codebook digest; runs from before that are not checked)."""
    from dcar.training.pretokenize import tokens_fingerprint

    trained_on = next((m["tokenizer"] for m in data_metas(run_dir) if "tokenizer" in m), None)
    if trained_on is not None and trained_on != tokens_fingerprint(tok):
        raise ExportError(
            f"{source}: its encoder or codebook differ from those of the tokenizer whose ids {run_dir} was "
            "trained on: the generator's ids would mean other codewords; give the tokenizer it was trained "
            "with (or one that refines only its decoder)"
        )


def keep_previous(out: Path) -> None:
    """Move an evaluated model's card files to ``out/previous`` (replacing older ones) before overwriting."""
    if not (out / "eval.json").is_file():
        return
    prev = out / PREVIOUS
    shutil.rmtree(prev, ignore_errors=True)
    prev.mkdir()
    for name in CARD_FILES:
        if (out / name).is_file():
            shutil.move(str(out / name), str(prev / name))
