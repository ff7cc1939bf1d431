#!/usr/bin/env bash
# Create .venv and install hf-rfid with everything the tests, examples and benchmarks need.
# torch is installed first, pinned: a plain `torch` requirement with no torch present would pull a multi-GB CUDA
# build. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[dev,bench]"
