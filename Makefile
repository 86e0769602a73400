# The README's commands: `make test` and `make demo` set everything up on a fresh machine.
# `make demo` installs only what the demo needs (torch, the package with its `train` and
# `bench` extras, versions pinned by requirements-dev.txt as constraints); `make test` (and
# `make venv`) install the full development set, which includes the demo's.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
GPU_OUT ?= bench/results/gpu-check
# pyproject.toml's requires-python, said before a venv is made (pip's refusal is cryptic)
PYCHECK = $(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "sgdpo_fast needs Python >= 3.10; $(PY) is " + sys.version.split()[0] + ": run make PY=python3.11 ...")'

.PHONY: venv demo-venv test test-fast demo bench gpu-check nvcc-check wheel-check clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || { $(PYCHECK) && $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): setup.py pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || { $(PYCHECK) && $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c requirements-dev.txt -e ".[train,bench]"
	touch $(DEMO_STAMP)

venv: $(STAMP)

demo-venv: $(DEMO_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" tests

demo: $(DEMO_STAMP)
	$(BIN)/python -m examples.demo

bench: $(STAMP)
	$(BIN)/python -m bench

# sdist + wheel with `python -m build`, the wheel installed into a clean venv, smoke-tested
wheel-check: $(STAMP)
	bash scripts/wheel_check.sh

# On a CUDA machine with the project's files and no network: system python, no venv.
gpu-check:
	GPU_OUT=$(GPU_OUT) bash bench/gpu_check.sh

nvcc-check:
	bash scripts/nvcc_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info sgdpo_fast/*.so
