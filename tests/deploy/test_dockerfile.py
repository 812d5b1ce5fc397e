"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

What a build would trip on: every file the Dockerfile copies exists and is not dropped by .dockerignore, the
wheel gets every package folder and the embedded default weights, the stages refer to each other, the base
image is pinned by digest, the final stages run as a non-root user, the OCI labels say what pyproject.toml
says, and the HEALTHCHECK (compose's too) probes readiness on a live server. The pip steps and their lock
files are in test_docker_locks.py, the compose file in test_docker_compose.py; the parsing in docker_files.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from docker_files import (
    DOCKER,
    EMBEDDED_DEFAULT,
    PYPROJECT,
    REPO,
    args_of,
    compose,
    copies,
    docker_args,
    stages,
)
from server_harness import live_server

from dcar.server.settings import Settings

DOCKERIGNORE = REPO / ".dockerignore"


def dockerignore_regexes() -> list[tuple[bool, re.Pattern]]:
    """(is exception, regex) per .dockerignore line, with Docker's pattern syntax (``**``, ``*``, ``?``)."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex + r"\Z")))
    return out


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def test_every_copied_path_exists_and_reaches_the_build_context():
    rules = dockerignore_regexes()
    missing, dropped = [], []
    for sources, _dest in copies():
        for src in sources:
            path = REPO / src
            if not path.exists():
                missing.append(src)
                continue
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            assert files, f"COPY {src}: nothing to copy"
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" not in rel and not rel.endswith(".pyc") and ignored(rel, rules):
                    dropped.append(rel)
    assert dropped == [], f"copied files that .dockerignore leaves out of the context: {dropped[:10]}"
    assert missing == [], f"COPY sources that do not exist: {missing}"


def test_the_wheel_gets_every_package_folder_and_its_data():
    """The builder copies each folder pyproject maps into the ``dcar`` namespace, and the files it ships."""
    copied = {src.rstrip("/") for sources, _ in copies() for src in sources}
    for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        assert folder in copied or any(c.startswith(folder + "/") for c in copied), folder
    assert {"pyproject.toml", "README.md", EMBEDDED_DEFAULT} <= copied


def test_dockerignore_keeps_bulky_and_private_paths_out():
    rules = dockerignore_regexes()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "runs/tiny-shapes/x.pt",
        "weights/official/dc-ht/x.bin",
        "server/__pycache__/app.cpython-311.pyc",
        "tests/server/test_x.py",
        "docker/lock.sh",
    ):
        assert ignored(path, rules), path
    for path in (
        "server/app.py",
        "pyproject.toml",
        "weights/dcar-tiny-shapes/config.json",
        "docker/requirements.lock",
    ):
        assert not ignored(path, rules), path


def test_dockerfile_shape():
    names = list(stages())
    assert names == ["base", "build", "build-ray", "common", "ray", "runtime"], names
    for name, body in stages().items():
        image = body[0][1]
        assert image in names[: names.index(name)] or image == "${BASE_NAME}@${BASE_DIGEST}", (name, image)
    arg = docker_args()
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", arg["BASE_NAME"])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", arg["BASE_DIGEST"]), "the base image is pinned by digest"
    # The last stage is what a plain `docker build` gives: the server, as a non-root user, no compilers.
    final = stages()["runtime"]
    for stage in ("runtime", "ray"):
        body = stages()[stage]
        users = [rest for w, rest in body if w == "USER"]
        assert users == ["dcar"], (stage, users)
        words = [w for w, _ in body]
        assert not [i for i, w in enumerate(words) if w == "RUN" and i > words.index("USER")], (
            f"{stage}: a RUN after USER runs as the user"
        )
        assert (
            "COPY",
            f"--from={'build' if stage == 'runtime' else 'build-ray'} /opt/venv /opt/venv",
        ) in body
    assert args_of(next(rest for w, rest in final if w == "CMD")) == ["dcar", "serve"]
    assert args_of(next(rest for w, rest in stages()["ray"] if w == "CMD")) == ["dcar", "serve", "--ray"]
    common = stages()["common"]
    volumes = [v for w, rest in common if w == "VOLUME" for v in args_of(rest)]
    assert volumes == ["/weights"]
    health = next(rest for w, rest in common if w == "HEALTHCHECK")
    assert "/readyz" in health and "--start-period" in health
    env = " ".join(rest for w, rest in common if w == "ENV")
    assert "DCAR_HOST=0.0.0.0" in env and "DCAR_PORT=8000" in env and "DCAR_WEIGHTS" not in env


def test_oci_labels():
    labels = {}
    for word, rest in stages()["common"]:
        if word == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                labels[key] = value
    arg = docker_args()
    expand = {
        "${VERSION}": arg["VERSION"],
        "${BASE_NAME}": arg["BASE_NAME"],
        "${BASE_DIGEST}": arg["BASE_DIGEST"],
    }
    labels = {k: expand.get(v, v) for k, v in labels.items()}
    prefix = "org.opencontainers.image."
    for key in (
        "title",
        "description",
        "version",
        "revision",
        "created",
        "licenses",
        "base.name",
        "base.digest",
    ):
        assert labels.get(prefix + key), key
    assert labels[prefix + "version"] == PYPROJECT["project"]["version"]
    assert labels[prefix + "licenses"] == PYPROJECT["project"]["license"]  # both SPDX expressions
    assert (
        f"{labels[prefix + 'base.name']}@{labels[prefix + 'base.digest']}"
        == f"{arg['BASE_NAME']}@{arg['BASE_DIGEST']}"
    )


def healthcheck_command() -> list[str]:
    health = next(rest for w, rest in DOCKER if w == "HEALTHCHECK")
    return args_of(health[health.index(" CMD ") + 5 :].strip())


def test_the_healthcheck_command_probes_readiness(deploy_pipe):
    """The image's HEALTHCHECK (and compose's, the same command) run against a live server, and a dead port."""
    command = healthcheck_command()
    assert compose()["services"]["dcar"]["healthcheck"]["test"] == ["CMD", *command]
    assert command[0] == "python"
    probe = [sys.executable, *command[1:]]
    with live_server(deploy_pipe) as (url, _app):
        port = url.rsplit(":", 1)[1]
        ok = subprocess.run(probe, env={**os.environ, "DCAR_PORT": port}, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(probe, env={**os.environ, "DCAR_PORT": port}, capture_output=True, timeout=30)
    assert down.returncode != 0


def test_embedded_default_travels_in_the_wheel():
    """With DCAR_WEIGHTS unset the image serves the embedded default: it must be package data of the wheel."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["dcar.weights"]
    shipped = [
        p.relative_to(REPO / "weights").as_posix()
        for p in (REPO / EMBEDDED_DEFAULT).rglob("*")
        if p.is_file()
    ]
    assert shipped
    unmatched = [f for f in shipped if not any(Path(f).match(pattern) for pattern in data)]
    assert unmatched == [], f"embedded weights files the wheel would leave out: {unmatched}"
    assert Path(Settings.model_fields["weights"].default).parts[-2:] == ("weights", "dcar-tiny-shapes")
    assert compose()["services"]["dcar"]["environment"]["DCAR_WEIGHTS"] is None  # passed through, else unset
