# Set-up and entry points. `make quickstart` and `make test` create .venv on first use and
# reinstall only when pyproject.toml changes.
#
# On a machine without a GPU, torch is installed first as the CPU build pinned below, so the
# project's `torch>=...` requirement never pulls a multi-GB CUDA wheel. Elsewhere, point pip at
# the CPU wheels with e.g. `make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_CPU) (CPU build)"; \
		$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

quickstart: $(STAMP)
	$(VENV)/bin/align quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
