#!/usr/bin/env bash
# Create .venv and install hf-rfid with everything the tests, examples and benchmarks need.
# torch is installed first, pinned, so that the project's plain `torch` requirement does not pull another build. Where
# pip's index serves a CPU wheel of torch 2.13.0 (as on our CI machines) that is all; on plain PyPI a Linux torch wheel
# is the multi-GB CUDA build, so choose with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "setup.sh: hf-rfid needs Python >= 3.10 ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
    exit 1
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[dev,bench]"
