#!/usr/bin/env bash
# The command line on the bundled trained MoE: compress, inspect, evaluate (with routing agreement), dequantize.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/hf-rfid-cli}
rm -rf "$OUT"
hf-rfid compress assets/tiny-moe --output "$OUT/compressed" --keep 0.6 \
    --calibration assets/data/wiki_calibration.txt --num-samples 32 --seq-len 256
hf-rfid inspect "$OUT/compressed"
hf-rfid evaluate "$OUT/compressed" --data assets/data/wiki_heldout.txt --reference assets/tiny-moe --max-tokens 8192 \
    --record
hf-rfid dequantize "$OUT/compressed" --output "$OUT/dense"
python -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('$OUT/dense'); print('dense copy loads without hf_rfid')"
