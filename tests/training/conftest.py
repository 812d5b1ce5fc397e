"""Fixtures for the training tests: the ``ci`` preset (toy sizes) trained for a few steps, once per session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dcar.training.distributed import Dist
from dcar.training.presets import CI, TrainPreset
from dcar.training.runlog import RunOptions

SINGLE = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def ci_options(**kw) -> RunOptions:
    """fp32 (bitwise-stable on any CPU), no time-based checkpoints or samples unless asked."""
    base = dict(seed=0, precision="fp32", checkpoint_minutes=0.0, sample_minutes=0.0, progress_bar=False)
    base.update(kw)
    return RunOptions(**base)


@pytest.fixture(scope="session")
def ci_preset() -> TrainPreset:
    return replace(CI, tokenizer=replace(CI.tokenizer, stage_steps=(4, 4, 4)))


@pytest.fixture(scope="session")
def ci_tokenizer_run(tmp_path_factory, ci_preset) -> Path:
    """A finished ci tokenizer run (12 steps)."""
    from dcar.training.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(ci_preset, out, SINGLE, ci_options())
    return out


@pytest.fixture(scope="session")
def ci_data(tmp_path_factory) -> Path:
    """Directory for the pre-tokenized ci dataset (filled by the first generator run)."""
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="session")
def ci_generator_run(tmp_path_factory, ci_preset, ci_tokenizer_run, ci_data) -> Path:
    """A finished ci generator run (a few steps)."""
    from dcar.training.train_generator import train_generator

    gen = tmp_path_factory.mktemp("gen")
    train_generator(ci_preset, ci_tokenizer_run, ci_data, gen, SINGLE, ci_options())
    return gen


@pytest.fixture(scope="session")
def ci_weights(tmp_path_factory, ci_preset, ci_tokenizer_run, ci_generator_run) -> Path:
    """The ci generator run exported to a weights directory."""
    from dcar.training.export import export

    return export(
        ci_preset, ci_tokenizer_run, ci_generator_run, tmp_path_factory.mktemp("weights") / "dcar-ci"
    )


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread while training in tests: on a shared 2-core machine, spinning OpenMP workers of
    several processes (OMP_WAIT_POLICY unset) slow these tiny steps down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
