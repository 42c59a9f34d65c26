# goldiclip-pipeline: `make demo` runs the pipeline on its embedded sample,
# `make test` runs the test suite. Both build .venv from nothing on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= demo-run
# Installed first and pinned: the CPU wheel of this release is on disk here; an
# unpinned torch would pull a multi-GB CUDA build. On a GPU node pick the build
# for your CUDA/ROCm with the same version.
TORCH_VERSION ?= 2.13.0

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench-download clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/goldiclip demo --workdir $(WORKDIR)

bench-download: install
	$(BIN)/python bench/download.py

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
