# The README's commands: `make test` and `make demo` set everything up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
GPU_OUT ?= bench/results/gpu-check

.PHONY: venv test test-fast demo bench gpu-check nvcc-check clean

$(STAMP): setup.py requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" tests

demo: $(STAMP)
	$(BIN)/python -m examples.demo

bench: $(STAMP)
	$(BIN)/python -m bench

# On a CUDA machine with the project's files and no network: system python, no venv.
gpu-check:
	GPU_OUT=$(GPU_OUT) bash bench/gpu_check.sh

nvcc-check:
	bash scripts/nvcc_check.sh

clean:
	rm -rf $(VENV) build *.egg-info sgdpo_fast/*.so
