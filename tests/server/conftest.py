"""Fixtures for the server tests: the tiny random pipeline (native 128x128, 4x4 tokens) shared by every app.

Every test goes through the HTTP interface of a real app (server_harness.py); nothing here mocks the server.
"""

from __future__ import annotations

import pytest

from dcar.model.config import pipeline_preset
from dcar.model.pipeline import Pipeline


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def pipe() -> Pipeline:
    p = Pipeline.from_config(pipeline_preset("tiny"), device="cpu", seed=0, name="tiny-random")
    p.generate([p.params("first call pays the one-time kernel setup", seed=0)])
    return p
