"""Shared fixtures: reference data locations and a tiny random pipeline (CPU, float32, seeded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Golden tensors of the official code; override with DCAR_GOLDEN_DIR to check another golden set."""
    path = Path(os.environ.get("DCAR_GOLDEN_DIR", REFERENCE / "golden"))
    assert (path / "README.md").is_file(), f"golden directory {path} not found (set DCAR_GOLDEN_DIR)"
    return path


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    path = REFERENCE / "official-keys"
    assert path.is_dir(), f"official key lists not found at {path}"
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    from dcar.model.config import pipeline_preset
    from dcar.model.pipeline import Pipeline

    return Pipeline.from_config(pipeline_preset("tiny"), seed=0)
