"""The Dockerfile's pip steps and docker/*.lock, checked without a Docker engine.

Every pip step installs hash-locked requirements or the package's own wheel (never editable, nothing
fetched for it), the lock files reach the stages that install them, and the locks pin what pyproject.toml
asks for on the image's platform (torch as the Makefile pins it; the Ray image only adds packages).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from docker_files import PYPROJECT, REPO, copies, docker_args, stages
from packaging.markers import default_environment
from packaging.requirements import Requirement

MAKEFILE = REPO / "Makefile"
LOCKS = {
    name: REPO / "docker" / f"{name}.lock"
    for name in ("requirements", "requirements-ray", "build-requirements")
}
# The image's interpreter (Ubuntu 24.04's python3) and platform: the environment lock markers are read in.
IMAGE_ENV = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def pip_installs(commands: list[str], variables: dict[str, str]) -> list[list[str]]:
    """The arguments of every ``pip install`` in shell commands, variables expanded, verbosity flags dropped."""
    out = []
    for command in commands:
        for var, value in variables.items():
            command = (
                command.replace(f"$({var})", value).replace(f"${{{var}}}", value).replace(f"${var}", value)
            )
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            pips = [
                i for i, w in enumerate(words) if w.endswith("pip") and words[i + 1 : i + 2] == ["install"]
            ]
            if pips:
                out.append([w for w in words[pips[0] + 2 :] if w not in ("--quiet", "-q")])
    return out


def makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(variables, {target: recipe lines}) of the Makefile."""
    text = MAKEFILE.read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*\??:?=\s*(.*)$", text, re.M))
    recipes: dict[str, list[str]] = {}
    target = None
    for line in text.splitlines():
        if m := re.match(r"^([^\s#:=][^:=]*):(?!=)", line):
            target = m.group(1).strip()
            recipes[target] = []
        elif line.startswith("\t") and target is not None:
            recipes[target].append(line.strip())
    return variables, recipes


def lock_entries(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """{normalised name: (version, marker, sha256 hashes)} of a ``--generate-hashes`` requirements file."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        req = Requirement(re.sub(r"\s*--hash=\S+", "", line))
        [spec] = list(req.specifier)
        assert spec.operator == "==", f"{path.name}: {line[:80]} is not pinned with =="
        out[req.name.lower().replace("_", "-")] = (spec.version, str(req.marker or ""), hashes)
    return out


def image_pip_steps() -> dict[str, list[list[str]]]:
    """{stage: pip install argument lists of its RUN steps}."""
    return {
        name: pip_installs([rest for w, rest in body if w == "RUN"], docker_args())
        for name, body in stages().items()
    }


def test_every_pip_step_is_hash_locked_or_the_built_wheel():
    steps = [step for per_stage in image_pip_steps().values() for step in per_stage]
    assert steps, "no pip install in the Dockerfile"
    locked, wheels = [], []
    for step in steps:
        assert "-e" not in step and "--editable" not in step, f"editable install: {step}"
        if "--require-hashes" in step:
            assert step[-2] == "-r" and "--no-deps" in step, step
            locked.append(Path(step[-1]).name)
        else:  # the package itself: the wheel built in the same stage, nothing fetched
            assert "--no-index" in step and "--no-deps" in step and step[-1].endswith(".whl"), step
            wheels.append(step[-1])
    assert sorted(locked) == sorted(f.name for f in LOCKS.values()), locked
    assert len(wheels) == 1
    build = stages()["build"]
    assert any("pip wheel" in rest and "--no-build-isolation" in rest for w, rest in build if w == "RUN")
    # The lock files reach the stages that install them.
    sent = {Path(src).name for sources, _ in copies() for src in sources if src.startswith("docker/")}
    assert sent == set(locked)


def test_locks_pin_with_hashes_what_pyproject_asks_for():
    variables, _ = makefile()
    runtime, ray, build = (
        lock_entries(LOCKS[n]) for n in ("requirements", "requirements-ray", "build-requirements")
    )
    for entries in (runtime, ray, build):
        assert entries and all(hashes for _v, _m, hashes in entries.values())

    def check(requirements: list[str], entries: dict, where: str) -> None:
        for text in requirements:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(IMAGE_ENV):
                continue
            name = req.name.lower().replace("_", "-")
            assert name in entries, f"{where}: {req} is not in the lock; run `sh docker/lock.sh`"
            assert req.specifier.contains(entries[name][0], prereleases=True), (
                f"{where}: {name}=={entries[name][0]} does not satisfy {req}; run `sh docker/lock.sh`"
            )

    check(PYPROJECT["project"]["dependencies"], runtime, "requirements.lock")
    check(
        PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["ray"],
        ray,
        "requirements-ray.lock",
    )
    check(PYPROJECT["build-system"]["requires"], build, "build-requirements.lock")
    torch_pin = Requirement(variables["TORCH_SPEC"])
    assert runtime["torch"][0] == next(iter(torch_pin.specifier)).version, (
        "the image's torch is the Makefile's"
    )
    # uvicorn[standard]'s extras come along (uvloop and httptools are what make it fast).
    assert {"uvloop", "httptools", "websockets"} <= set(runtime)
    # The Ray image only adds packages: every runtime pin is the same, with the same files.
    changed = {n for n, entry in runtime.items() if ray.get(n) != entry}
    assert changed == set(), f"requirements-ray.lock moves runtime pins: {sorted(changed)}"
    # Every marker in the locks holds on the image's platform (a pin that would not install is a silent gap).
    skipped = [
        n
        for entries in (runtime, ray)
        for n, (_v, m, _h) in entries.items()
        if m and not Requirement(f"x; {m}").marker.evaluate(IMAGE_ENV)
    ]
    assert skipped == [], skipped
