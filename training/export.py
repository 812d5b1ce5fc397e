"""Export trained runs to a weights directory: ``Pipeline.save_pretrained`` plus ``training.json``.

The directory is the dcar layout (model_index.json, tokenizer/, generator/, text_encoder/) that
``Pipeline.from_pretrained`` loads; ``training.json`` records how it was made (recipe, wall times,
hardware) for the model card that ``dcar eval --write-card`` writes beside it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dcar.model.config import PipelineConfig
from dcar.model.pipeline import Pipeline
from dcar.training.presets import TrainPreset
from dcar.training.runlog import DONE
from dcar.training.train_generator import load_trained_generator
from dcar.training.train_tokenizer import load_trained_tokenizer

TRAINING_JSON = "training.json"


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
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _done(run_dir: Path) -> dict[str, Any]:
    path = run_dir / DONE
    return json.loads(path.read_text()) if path.is_file() else {}


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
    gen, text, gcfg = load_trained_generator(generator_dir, preset)
    sampling = preset.pipeline.sampling
    if guidance_scale is not None:
        sampling = replace(sampling, guidance_scale=guidance_scale)
    if randomize_temperature is not None:
        sampling = replace(sampling, randomize_temperature=randomize_temperature)
    config = PipelineConfig(preset.pipeline.tokenizer, gcfg, preset.pipeline.text_encoder, sampling)
    name = name or f"dcar-{preset.name}"
    pipe = Pipeline(config, tok, gen, text, name=name, device="cpu", dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, name)
    tok_done, gen_done = _done(tokenizer_dir), _done(generator_dir)
    meta_path = generator_dir / "data_meta.json"
    record = {
        "preset": preset.to_dict(),
        "tokenizer_seconds": tok_done.get("seconds"),
        "generator_seconds": gen_done.get("seconds"),
        "pretokenize_seconds": json.loads(meta_path.read_text()).get("seconds_last_session")
        if meta_path.is_file()
        else None,
        "vae_scale": gcfg.head.vae_scale,
        "parameters": {
            "tokenizer": sum(p.numel() for p in pipe.tokenizer.parameters()),
            "generator": sum(p.numel() for p in pipe.generator.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
        "hardware": hardware(),
    }
    (out / TRAINING_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return out
