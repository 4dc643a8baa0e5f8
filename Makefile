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
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

# `make test`: the suite on this venv's transformers (5.x), then the fast suite again on transformers
# 4.57.x with the peers installed (PEFT 0.21.2, adapters 1.3.0: their oracle tests run there). The peer
# venv builds in the background while lint, mypy and the first suite run; its log is $(PEER_LOG).
PEER ?= $(VENV)/peer
PEER_LOG := $(VENV)/peer-build.log

test: setup
	@set -e; \
	PYTHON=$(PYTHON) bash scripts/peer_env.sh $(PEER) > $(PEER_LOG) 2>&1 & peer=$$!; \
	if ! $(MAKE) --no-print-directory lint typecheck unit; then kill $$peer 2>/dev/null || true; exit 1; fi; \
	if ! wait $$peer; then echo "building the peer venv failed:"; cat $(PEER_LOG); exit 1; fi; \
	$(MAKE) --no-print-directory peer-unit

# The fast tests (not `slow`, not `heavy`) on transformers 4.57.x, with PEFT and adapters importable.
.PHONY: peer-env peer-unit peer-test
peer-env:
	PYTHON=$(PYTHON) bash scripts/peer_env.sh $(PEER)

peer-unit:
	@echo "transformers 4.57 leg: $$($(PEER)/bin/python -c 'import transformers, peft, adapters; print("transformers", transformers.__version__, "peft", peft.__version__, "adapters", adapters.__version__)')"
	$(PEER)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -p no:cacheprovider -m "not slow and not heavy"

# Only the interop tests against the real PEFT and adapters (quick, while working on interop).
peer-test: peer-env
	OMP_NUM_THREADS=1 $(PEER)/bin/python -m pytest -q -p no:cacheprovider tests/test_interop_peft*.py tests/test_interop_adapters*.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
