# HOSA workbench. `make demo` = set up + full pipeline on the synthetic dataset;
# `make test` = set up + test suite. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: setup demo test bench lab clean-outputs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no later requirement can pull a CUDA build of another release
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m hosa_lib.pipeline $(PARAMS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_store.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
