# gptmini: `make test` and `make demo` are the two commands a new user needs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine with an NVIDIA driver take a CUDA build of torch from the index; elsewhere the
# CPU wheel (torch 2.13.0 lies on disk here). Override with `make TORCH='torch==2.x.y' ...`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo up down clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo:
	@echo "make demo arrives with the pipeline issue (Prefect deployment train-gpt/demo)." >&2; exit 2

clean:
	rm -rf $(VENV) .pytest_cache
