# The two commands of the README: `make demo` and `make test`. Both set everything up first:
# a virtual environment in .venv, torch 2.13.0 (the CPU wheel; installed first so nothing pulls a
# CUDA build), then modfit with its dev extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modfit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test lint typecheck unit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,plot]"
	touch $(STAMP)

demo: setup
	$(BIN)/modfit demo --out demo_out

lint: setup
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench

typecheck: setup
	$(BIN)/mypy

# Test processes: CI has 2 cores, and every test runs on one thread (tests/conftest.py).
TEST_WORKERS ?= 2

unit: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

test: lint typecheck unit

# The interop tests against the real PEFT and adapters, in a peer venv with transformers 4.57.x, peft 0.21.2
# and adapters 1.3.0
# (scripts/peer_env.sh builds it once); not part of `make test`.
PEER ?= $(VENV)/peer

.PHONY: peer-test
peer-test:
	PYTHON=$(PYTHON) bash scripts/peer_env.sh $(PEER)
	PYTHONPATH=src OMP_NUM_THREADS=1 $(PEER)/bin/python -m pytest -q -p no:cacheprovider tests/test_interop_peft*.py tests/test_interop_adapters*.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
