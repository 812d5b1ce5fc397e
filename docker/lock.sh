#!/bin/sh
# Regenerates the image's hash-locked requirements from pyproject.toml and docker/*.in, for the image's Python
# (Ubuntu 24.04: CPython 3.12) on Linux x86-64, whatever machine runs this:
#   docker/requirements.lock        runtime dependencies, torch pinned by docker/requirements.in
#   docker/requirements-ray.lock    the same pins plus the `ray` extra (the image's `ray` target, for KubeRay)
#   docker/build-requirements.lock  what builds the dcar wheel (pyproject's [build-system] requires)
# Needs uv (`pip install uv`) and access to PyPI. Run from anywhere: `sh docker/lock.sh`.
set -eu
cd "$(dirname "$0")/.."
compile() {
    out="$1"
    shift
    uv pip compile --quiet --no-config --index-url https://pypi.org/simple \
        --python-version 3.12 --python-platform x86_64-manylinux_2_39 \
        --generate-hashes --no-strip-markers --custom-compile-command "sh docker/lock.sh" \
        "$@" -o "$out"
}
compile docker/requirements.lock pyproject.toml docker/requirements.in
# The runtime pins constrain the Ray lock, so the `ray` image only adds packages to the runtime image's.
compile docker/requirements-ray.lock --extra ray --constraint docker/requirements.lock pyproject.toml docker/requirements.in
compile docker/build-requirements.lock docker/build-requirements.in
