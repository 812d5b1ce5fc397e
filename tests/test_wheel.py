"""The wheel works on its own: built from the checkout, installed into a fresh venv outside it, it generates an
image with the embedded weights from a directory that knows nothing of the checkout.

The fresh venv gets the dependencies (torch, transformers, ...) by a ``.pth`` line naming this environment's
site-packages: a path added that way is searched, but its own ``.pth`` files are not run, so the editable
install's import hook stays out and ``dcar`` can only come from the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(argv: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> str:
    out = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{argv}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # --no-build-isolation: the build backend (setuptools) of this environment, nothing fetched
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO],
        cwd=root,
    )
    (wheel,) = dist.glob("dcar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dcar/weights/dcar-tiny-shapes/model_index.json" in names  # the embedded model is package data
    static = sorted(p.name for p in (REPO / "server" / "static").iterdir() if p.is_file())
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("dcar/server/static/")) == static
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # the SPDX metadata's file
    assert not [n for n in names if n.split("/")[0] in ("model", "server", "training", "cli", "tests")], (
        "the wheel must install one top-level package, dcar"
    )
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    site = Path(
        run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=root,
        ).strip()
    )
    (site / "dcar-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--no-deps",
            "-q",
            wheel,
        ],
        cwd=root,
    )
    return venv


def clean_env() -> dict:
    """This process's environment without anything that could point back at the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCAR_", "PYTHON", "VIRTUAL_ENV"))}
    env["OMP_NUM_THREADS"] = "2"
    return env


def test_the_installed_wheel_generates_with_the_embedded_weights(fresh_venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "model.py").write_text(
        "raise ImportError('a user file named model.py must not shadow dcar.model')\n"
    )
    where = run(
        [
            fresh_venv / "bin" / "python",
            "-c",
            "import dcar, dcar.model.pipeline, dcar.weights; "
            "print(dcar.__file__); print(dcar.model.pipeline.__file__); print(dcar.weights.embedded_weights())",
        ],
        cwd=work,
        env=clean_env(),
    ).split()
    for path in where:
        assert Path(path).resolve().is_relative_to(fresh_venv.resolve()), where  # not the checkout
    out = run(
        [
            fresh_venv / "bin" / "dcar",
            "generate",
            "a red circle",
            "-o",
            "circle.png",
            "--seed",
            "1",
            "--steps",
            "4",
            "--device",
            "cpu",
        ],
        cwd=work,
        env=clean_env(),
    )
    image = Image.open(work / "circle.png")
    assert image.format == "PNG" and image.size == (256, 256), out  # the embedded model's native size
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 16  # not a flat fill
