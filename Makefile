# Two commands for a newcomer (see README):  make main   |   make test
# Both create the virtual environment in .venv first if it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup main test bench lab clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The main job: regenerate every result notebook, table and figure under results/.
main: setup
	mkdir -p results/01_au_heatmaps
	cd notebooks && ../$(PY) -m papermill -k python3 --language python 01_au_heatmaps.ipynb ../results/01_au_heatmaps/01_au_heatmaps.ipynb -p output_dir ../results/01_au_heatmaps

# The test suite (what .ci/run runs).
test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/heatmaps.py
