# HOSA workbench. `make demo` = set up + full pipeline on the synthetic dataset;
# `make test` = set up + test suite; `make lab` = JupyterLab on this project. All create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml
# JupyterLab refuses to run as root without --allow-root
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup setup-dev demo test test-fast bench bench-scale gpu-check triton-aot tensorboard lab browser-check chromium clean-outputs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no later requirement can pull a CUDA build of another release
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	# no "official Jupyter news?" pop-up in this project's JupyterLab
	$(VENV)/bin/jupyter labextension disable --level=sys_prefix "@jupyterlab/apputils-extension:announcements" >/dev/null 2>&1
	# notebooks/*.ipynb are saved without outputs (hosa_lib/notebook_hooks.py), and git strips them too
	mkdir -p $(VENV)/etc/jupyter
	echo '{"FileContentsManager": {"pre_save_hook": "hosa_lib.notebook_hooks.strip_on_save"}}' \
	  > $(VENV)/etc/jupyter/jupyter_server_config.json
	-git rev-parse --is-inside-work-tree >/dev/null 2>&1 && \
	  git config filter.nbstripout.clean "'$(abspath $(PY))' -m nbstripout --keep-id" && \
	  git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.extrakeys "metadata.language_info" && \
	  git config diff.ipynb.textconv "'$(abspath $(PY))' -m nbstripout -t --keep-id"
	touch $@

# The test-only packages (pytest, Triton for its CPU interpreter ~1 GB, Playwright ~170 MB, ...) come with
# `make test`, not with `make demo` / `make lab`.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(PY) -m hosa_lib.pipeline $(PARAMS)

test: setup-dev chromium
	$(PY) -m pytest -q

# Everything not marked slow (slow: notebook and pipeline runs, kill/resume, DDP, browser, AOT compile)
test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

# The browser check (tests/test_browser.py) needs Debian's Chromium; as root it is installed here,
# otherwise that one test is skipped with its reason.
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { echo "installing Debian's chromium for the browser check"; apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || true

bench: setup-dev
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_store.py

# COCO scale on generated TERAN-layout files at two sizes: seconds, rates, peak RSS, growth exponents
bench-scale: setup-dev
	$(PY) benchmarks/bench_scale.py --sizes 1000 5000

# On a CUDA machine (<= 10 min): Triton vs eager, bf16 training steps, COCO-5K-shaped evaluation; skips without CUDA
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out outputs/gpu_check.json

# No GPU needed: compile the Triton kernels for sm_80/sm_90, print shared memory, registers, spills per length
triton-aot: setup-dev
	$(PY) benchmarks/triton_aot.py

# Training curves of every run under outputs/ (or RUN=outputs/<run>): losses, lr, term weights, val metrics
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(or $(RUN),outputs)

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate $(ROOT_FLAG)

browser-check: setup-dev chromium
	$(PY) -m pytest -q -m browser -rs -s

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
