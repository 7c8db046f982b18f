# Two commands for a fresh machine (see README.md):
#   make demo   set everything up (.venv) and run the main job on the embedded data
#   make test   set everything up (.venv) and run the checks and the default test suite
# Both create .venv on the first run and reuse it afterwards.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.xai-sparsity-installed
DEMO_OUT ?= runs/demo
STUDY_OUT ?= runs/claims_v2
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all lint bench study check-science clean

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "import torch, torchvision, captum, ipywidgets; print('torch', torch.__version__, '| torchvision', torchvision.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/xai-sparsity demo --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: setup
	bash scripts/ensure_chromium.sh
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory check-science
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]" || echo "torchlens did not install: its benchmark row will say SKIP"
	$(PY) benchmarks/run_all.py

study: setup
	$(BIN)/xai-sparsity study studies/claims_v2.toml --out $(STUDY_OUT)

# docs/science.md's generated part must be what the committed study summary generates
check-science: setup
	$(BIN)/xai-sparsity study-report docs/study/summary.csv --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
