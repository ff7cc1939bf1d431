"""Compress a MoE with the Python API, save it, load it back with plain transformers, and compare.

python examples/compress_and_load.py [--model assets/tiny-moe] [--keep 0.6] [--output /tmp/tiny-moe-rfid]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_rfid  # noqa: F401  (registers the rfid_moe quantization method with transformers)
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.writer import save_compressed
from hf_rfid.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "tiny-moe"))
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--output", default="/tmp/tiny-moe-rfid")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    compressor = RFIDCompressor(RFIDMoEConfig(keep=args.keep))
    compressed = compressor.compress(
        model, REPO / "assets" / "data" / "wiki_calibration.txt", tokenizer=tokenizer, num_samples=32, seq_len=256
    )
    save_compressed(compressed, args.output, tokenizer=tokenizer, report=compressor.report, overwrite=True)

    again = AutoModelForCausalLM.from_pretrained(args.output)  # after `import hf_rfid`: factorised experts
    ids = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(compressed(ids).logits, again(ids).logits)
    heldout = REPO / "assets" / "data" / "wiki_heldout.txt"
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    totals = compressor.report["totals"]
    print(f"kept fraction {totals['kept_fraction']:.3f}, MoE-parameter reduction {totals['moe_reduction']:.3f}")
    print(f"reloaded logits identical to the in-memory model: {same}")
    for name, current in (("dense", dense), ("compressed", again)):
        print(f"{name:>10}: perplexity {perplexity(current, tokenizer, heldout, max_tokens=8192)['perplexity']:.2f}")
    print(f"inspect it with: hf-rfid inspect {args.output}")


if __name__ == "__main__":
    main()
