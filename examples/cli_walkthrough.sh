#!/usr/bin/env bash
# The command line on the bundled trained MoE: compress, inspect, evaluate (with routing agreement), dequantize.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d -t hf-rfid-cli.XXXXXX)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "cli_walkthrough: $OUT exists and is not empty; give a new or empty directory" >&2
    exit 2
fi
echo "writing to $OUT"
hf-rfid compress assets/tiny-moe --output "$OUT/compressed" --keep 0.6 \
    --calibration assets/data/wiki_calibration.txt --num-samples 32 --seq-len 256
hf-rfid inspect "$OUT/compressed"
hf-rfid evaluate "$OUT/compressed" --data assets/data/wiki_heldout.txt --reference assets/tiny-moe --max-tokens 8192 \
    --record
hf-rfid dequantize "$OUT/compressed" --output "$OUT/dense"
python -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('$OUT/dense'); print('dense copy loads without hf_rfid')"
