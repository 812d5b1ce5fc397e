"""Fixtures of the deployment tests: the tiny random pipeline and the server test harness (a live uvicorn).

The server harness lives in tests/server/server_harness.py; this folder reuses it rather than copying it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from dcar.model.config import pipeline_preset  # noqa: E402
from dcar.model.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="session")
def deploy_pipe() -> Pipeline:
    """The tiny random model (native 128x128) that the live servers of this folder serve."""
    p = Pipeline.from_config(pipeline_preset("tiny"), device="cpu", seed=0, name="tiny-random")
    p.generate([p.params("first call pays the one-time kernel setup", seed=0)])
    return p
