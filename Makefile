# dcar: `make serve` and `make test` set everything up (idempotent; a second run only checks stamps).
#
#   make serve       the HTTP server on $(HOST):$(PORT) with the embedded model (creates .venv on first use)
#   make test        the whole suite, as CI runs it (installs the Debian packages below first)
#   make test-fast   the inner loop: everything but slow, browser (ui), deploy and Ray tests; no apt-get
#   make lint        ruff check + ruff format --check
#   make typecheck   mypy on model/ and server/
#
# System packages: `make test` installs three Debian packages with apt-get (through sudo unless run as
# root), each only when its binary is missing:
#   prometheus      -> /usr/bin/promtool        checks the /metrics exposition and the alerting rules
#   chromium        -> /usr/bin/chromium        headless browser for the playground tests (tests/ui)
#   docker-compose  -> /usr/bin/docker-compose  validates docker-compose.yml (no Docker engine needed)
# Nothing else is installed outside .venv, and nothing is downloaded at test time but these packages and
# the Python dependencies from PyPI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
# torch is pinned to the CPU wheel this machine carries; any torch>=2.3 works with the package itself.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Root installs Debian packages directly; anyone else goes through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# PyTorch's OpenMP threads busy-wait by default: on a shared CPU a 2-thread generation became ~100x slower
# while another process kept a core busy. Passive waiting costs nothing measurable when alone.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: serve test test-fast lint typecheck tiny-v1-runs train-tiny train-tiny-v2 clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

# promtool (Debian's prometheus package) checks the /metrics exposition in the server tests.
/usr/bin/promtool:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus

# Headless Chromium (Debian's chromium package) for the playground's browser tests (tests/ui, Playwright
# drives it through executable_path; Playwright's own browser download is never used).
/usr/bin/chromium:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

# docker-compose (Debian's) validates docker-compose.yml in tests/deploy; it needs no Docker engine.
/usr/bin/docker-compose:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends docker-compose

serve: $(VENV)/.installed
	$(BIN)/dcar serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test /usr/bin/promtool /usr/bin/chromium /usr/bin/docker-compose
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The markers are set in pyproject.toml and tests/conftest.py (ui and deploy: by folder).
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow and not ui and not deploy and not ray" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (dcar.model -> model/, ...): it reads the folders
# through links under build/typecheck/dcar/ (mypy_path in pyproject.toml).
TYPECHECK_LINKS := $(addprefix build/typecheck/dcar/,__init__.py model server training cli weights)
$(TYPECHECK_LINKS):
	mkdir -p build/typecheck/dcar
	ln -sfn $(CURDIR)/$(if $(filter __init__.py,$(@F)),dcar/__init__.py,$(@F)) $@

typecheck: $(VENV)/.installed-test $(TYPECHECK_LINKS)
	$(BIN)/mypy -p dcar.model -p dcar.server

# The committed weights' recipe from scratch into weights/dcar-tiny-shapes (about 5 hours on v1's 2-core
# CPU): tokenizer, pre-tokenizing, generator, export, eval. Each step resumes from its checkpoint under
# $(TINY_RUNS) and skips what is finished: rerun to continue.
# Each run's `done` file is its target: a finished run is not started again, and the export and evaluation
# (~11 min, and they move the committed card to previous/) run only when a run finished after the card.
TINY_RUNS ?= runs/tiny-shapes
TINY_WEIGHTS := weights/dcar-tiny-shapes
tiny-v1-runs: $(TINY_RUNS)/generator/done

$(TINY_RUNS)/tokenizer/done: | $(VENV)/.installed
	$(BIN)/dcar train tokenizer --preset tiny-shapes --threads 2 --out $(TINY_RUNS)/tokenizer

$(TINY_RUNS)/generator/done: $(TINY_RUNS)/tokenizer/done
	$(BIN)/dcar train generator --preset tiny-shapes --threads 2 \
		--tokenizer $(TINY_RUNS)/tokenizer --data $(TINY_RUNS)/tokens --out $(TINY_RUNS)/generator

train-tiny: $(TINY_WEIGHTS)/eval.json

$(TINY_WEIGHTS)/eval.json: $(TINY_RUNS)/tokenizer/done $(TINY_RUNS)/generator/done
	$(BIN)/dcar train export --preset tiny-shapes --name dcar-tiny-shapes --tokenizer $(TINY_RUNS)/tokenizer \
		--generator $(TINY_RUNS)/generator --out $(TINY_WEIGHTS)
	$(BIN)/dcar eval $(TINY_WEIGHTS) --threads 2 \
		--eval-split $(TINY_RUNS)/eval-split --write-card

# The v2 candidate of issue 14 (tiny-shapes-v2, being measured; docs/training.md): v1's runs, then its
# decoder refined and its generator trained further on new scenes (--seed 1), exported beside the runs
# rather than over the committed weights, and evaluated.
train-tiny-v2: tiny-v1-runs
	$(BIN)/dcar train tokenizer --preset tiny-shapes-v2 --threads 2 \
		--init-from $(TINY_RUNS)/tokenizer --out $(TINY_RUNS)/tokenizer-v2
	$(BIN)/dcar train generator --preset tiny-shapes-v2 --threads 2 --seed 1 --init-from $(TINY_RUNS)/generator \
		--tokenizer $(TINY_RUNS)/tokenizer-v2 --data $(TINY_RUNS)/tokens-v2 --out $(TINY_RUNS)/generator-v2
	$(BIN)/dcar train export --preset tiny-shapes-v2 --name dcar-tiny-shapes --tokenizer $(TINY_RUNS)/tokenizer-v2 \
		--generator $(TINY_RUNS)/generator-v2 --out $(TINY_RUNS)/v2-weights
	$(BIN)/dcar eval $(TINY_RUNS)/v2-weights --threads 2 \
		--eval-split $(TINY_RUNS)/eval-split --write-card

clean-venv:
	rm -rf $(VENV)
