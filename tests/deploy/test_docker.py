"""docker/Dockerfile, its lock files, .dockerignore and docker-compose.yml, checked without a Docker engine.

What a build or ``docker compose up`` would trip on is checked here: the compose file validates with the
compose client, every file the Dockerfile copies exists and is not dropped by .dockerignore, the stages refer
to each other, the base image is pinned by digest, every pip step installs hash-locked requirements or the
package's own wheel (never editable), the locks pin what pyproject.toml asks for (torch as the Makefile pins
it), and the pieces refer to each other consistently (service names, ports, paths, the settings the
environment sets, Grafana's provisioning).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from server_harness import live_server

from dcar.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
MAKEFILE = REPO / "Makefile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCKS = {
    name: REPO / "docker" / f"{name}.lock"
    for name in ("requirements", "requirements-ray", "build-requirements")
}
EMBEDDED_DEFAULT = "weights/dcar-tiny-shapes"
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


# --- Dockerfile ------------------------------------------------------------------------------------------


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


# --- docker-compose.yml --------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(path: Path) -> subprocess.CompletedProcess:
    client = compose_client()
    if client is None:
        pytest.skip(
            "no compose client (docker compose or docker-compose; `make test` installs docker-compose)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCAR_", "GRAFANA_", "COMPOSE_"))}
    return subprocess.run(
        [*client, "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def test_compose_file_is_valid_for_the_compose_client():
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_client_rejects_a_broken_gpu_reservation(tmp_path):
    broken = compose()
    broken["services"]["dcar"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"]["dcar"]["build"]["context"] = str(REPO)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert compose_config(path).returncode != 0, (
        "the compose client validates nothing: this test proves nothing"
    )


def resolve(value: str) -> str:
    """``${NAME:-default}`` as compose resolves it with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_dcar_service_reserves_a_gpu_and_builds_from_the_dockerfile():
    dcar = compose()["services"]["dcar"]
    assert Path(dcar["build"]["context"]) == Path(".") and REPO / dcar["build"]["dockerfile"] == DOCKERFILE
    [device] = dcar["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia" and device["count"] == 1
    assert [v.split(":")[1] for v in dcar["volumes"]] == [
        v for w, r in DOCKER if w == "VOLUME" for v in args_of(r)
    ]
    assert dcar["ports"] == ["${DCAR_PUBLISH_PORT:-8000}:8000"]
    assert "/readyz" in " ".join(dcar["healthcheck"]["test"])


def test_dcar_environment_is_valid_settings():
    env = {k: resolve(v) for k, v in compose()["services"]["dcar"]["environment"].items() if v is not None}
    fields = {f"DCAR_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"not settings: {set(env) - fields}"
    settings = Settings(**{k.removeprefix("DCAR_").lower(): v for k, v in env.items()})
    assert settings.device == "auto" and settings.api_keys == [] and settings.allowed_sizes == []
    grace = compose()["services"]["dcar"]["stop_grace_period"]
    assert float(grace.removesuffix("s")) > settings.drain_timeout_s, "docker would kill dcar mid-drain"


def test_prometheus_and_grafana_are_wired_to_the_shipped_files():
    services = compose()["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in prom["volumes"] if v.startswith("./")}
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert (
        mounts[str(config_path.parent)] / config_path.name
        == REPO / "docker" / "prometheus" / "prometheus.yml"
    )
    scrape = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    dcar_job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "dcar")
    assert dcar_job["static_configs"][0]["targets"] == ["dcar:8000"]  # the compose service and DCAR_PORT

    gmounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = gmounts["/etc/grafana/provisioning"]
    assert provisioning == REPO / "docker" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dcar.yml").read_text())["providers"]
    dashboards = gmounts[provider["options"]["path"]]
    assert (dashboards / "dcar.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert gmounts[str(Path(home).parent)] / Path(home).name == dashboards / "dcar.json"
    dash = json.loads((dashboards / "dcar.json").read_text())
    [ds_var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == source["uid"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert not dash.get("editable", True)


def test_health_checks_and_start_order():
    services = compose()["services"]
    assert all("healthcheck" in s for s in services.values()), [
        n for n, s in services.items() if "healthcheck" not in s
    ]
    assert services["prometheus"]["depends_on"] == {"dcar": {"condition": "service_started"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
