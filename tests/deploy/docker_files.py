"""docker/Dockerfile and docker-compose.yml read for the tests of this folder, without a Docker engine.

The repository paths, pyproject.toml, the Dockerfile parsed into instructions and stages (with its ARG
defaults and the files it copies from the build context), and the compose file, shared by
test_dockerfile.py, test_docker_locks.py and test_docker_compose.py.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EMBEDDED_DEFAULT = "weights/dcar-tiny-shapes"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments (and the syntax line) dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def args_of(text: str) -> list[str]:
    """The words of an instruction's arguments, exec form (JSON) or shell form."""
    return json.loads(text) if text.startswith("[") else shlex.split(text)


DOCKER = instructions(DOCKERFILE.read_text())


def stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: its instructions after FROM}, in order; the FROM line itself under key ``"FROM"``."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in DOCKER:
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            current = out.setdefault(name.strip(), [("FROM", image.strip())])
        elif current is not None:
            current.append((word, rest))
    return out


def docker_args() -> dict[str, str]:
    """ARG defaults of the Dockerfile (global and per stage)."""
    out = {}
    for word, rest in DOCKER:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value
    return out


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context (not ``--from`` another stage)."""
    out = []
    for word, rest in DOCKER:
        if word in ("COPY", "ADD"):
            words = args_of(rest)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())
