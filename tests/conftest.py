"""Shared fixtures: reference data locations and a tiny random pipeline (CPU, float32, seeded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"  # provenance and tolerances: tests/golden/README.md
# Folders whose every test carries a marker, so `make test-fast` can leave them out (-m "not ui ...").
FOLDER_MARKERS = {"ui": "ui", "deploy": "deploy"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[parts[0]])


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Golden tensors of the official code; DCAR_GOLDEN_DIR points at another set produced the same way."""
    path = Path(os.environ.get("DCAR_GOLDEN_DIR", GOLDEN))
    assert (path / "README.md").is_file(), f"golden directory {path} not found (set DCAR_GOLDEN_DIR)"
    return path


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    """Key lists and parameter counts of the full-size official checkpoints."""
    path = GOLDEN / "official-keys"
    assert path.is_dir(), f"official key lists not found at {path}"
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    from dcar.model.config import pipeline_preset
    from dcar.model.pipeline import Pipeline

    return Pipeline.from_config(pipeline_preset("tiny"), seed=0)
