"""Weights directories. ``dcar.weights`` carries the embedded default model as package data.

The official weights are never shipped: ``dcar fetch-weights`` downloads them (see README.md here).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EMBEDDED_NAME = "dcar-tiny-shapes"


def embedded_weights() -> Path:
    """Where the embedded default (``dcar-tiny-shapes``) lives in this installation."""
    return Path(str(files(__name__) / EMBEDDED_NAME))
