# Quick start: `make demo` (main job) and `make test` (test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench clean

$(BIN)/skillgraft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch is pinned: a plain `torch` requirement pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/skillgraft

demo: setup
	$(BIN)/skillgraft demo

test: setup
	$(BIN)/pytest -q tests

test-fast: setup
	$(BIN)/pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/skillgraft

bench: setup
	$(BIN)/python benchmarks/extract_apply.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
