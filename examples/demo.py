"""The first five minutes: compress a real MoE, compare it with the original, generate from both.

    python examples/demo.py            # SmolLM2-135M MoEfied (real pretrained weights; built on first use)
    python examples/demo.py --quick    # the small MoE trained from scratch that ships in assets/tiny-moe

Uses only files in this repository (the bundled Wikipedia excerpts for calibration and evaluation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_rfid
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.writer import save_compressed
from hf_rfid.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "assets" / "data" / "wiki_calibration.txt"
HELDOUT = REPO / "assets" / "data" / "wiki_heldout.txt"
PROMPT = "The Amazon River is"


def _model(quick: bool) -> tuple[Path, str]:
    if quick:
        return REPO / "assets" / "tiny-moe", (
            "a small OLMoE-architecture MoE trained from scratch on CPU on public English text (assets/tiny-moe). "
            "Models trained this briefly compress almost for free; run without --quick for real pretrained weights."
        )
    sys.path.insert(0, str(REPO / "benchmarks"))
    from moefy import build_moe

    print("building SmolLM2-135M-MoE on first use (a few minutes, cached afterwards) ...", flush=True)
    return Path(build_moe()), (
        "SmolLM2-135M-Instruct (real pretrained weights, Apache-2.0) converted into a Mixtral-architecture MoE: "
        "each layer's MLP neurons split into experts by co-activation, with fitted routers (benchmarks/moefy.py)."
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _generate(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="use the bundled small trained MoE")
    parser.add_argument("--keep", type=float, default=None, help="kept fraction (default: 0.6 quick, 0.8 otherwise)")
    parser.add_argument("--output", default=str(REPO / "demo_output"))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    started = time.perf_counter()
    model_dir, description = _model(args.quick)
    keep = args.keep if args.keep is not None else (0.6 if args.quick else 0.8)
    print(f"\nmodel: {model_dir}\n  {description}\n", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = RFIDMoEConfig(keep=keep)
    compressor = RFIDCompressor(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tick = time.perf_counter()
    compressor.compress(model, CALIBRATION, tokenizer=tokenizer, num_samples=32, seq_len=512)
    compress_seconds = time.perf_counter() - tick
    output = Path(args.output) / f"{model_dir.name}-rfid-keep{keep}"
    save_compressed(model.to(torch.bfloat16), output, tokenizer=tokenizer, report=compressor.report, overwrite=True)
    compressed = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()

    rows = []
    for name, current, path in (("dense", dense, model_dir), ("compressed", compressed, output)):
        tick = time.perf_counter()
        measured = perplexity(current, tokenizer, HELDOUT, max_tokens=args.eval_tokens, batch_size=4)
        rows.append((name, current, path, measured, time.perf_counter() - tick))
    totals = compressor.report["totals"]
    print("\n| model | parameters | on disk (MB) | perplexity | bits/byte | eval s |")
    print("|---|---|---|---|---|---|")
    for name, current, path, measured, seconds in rows:
        params = sum(p.numel() for p in current.parameters())
        print(
            f"| {name} | {params / 1e6:.1f} M | {_size(path) / 1e6:.1f} | {measured['perplexity']:.2f} "
            f"| {measured['bits_per_byte']:.4f} | {seconds:.1f} |"
        )
    print(
        f"\nRFID-MoE keep={keep}: kept fraction of the expert gate/up matrices {totals['kept_fraction']:.3f}, "
        f"MoE-parameter reduction {totals['moe_reduction']:.3f}, whole-model reduction {totals['model_reduction']:.3f}"
    )
    print(f"compression took {compress_seconds:.1f}s; checkpoint written to {output}")
    print(f"held-out text: {HELDOUT.name}, first {rows[0][3]['tokens']} predicted tokens")
    print(f"\nprompt: {PROMPT!r}")
    for name, current, *_ in rows:
        print(f"  {name:>10}: ...{_generate(current, tokenizer)}")
    print(f"\ntotal time {time.perf_counter() - started:.0f}s. Next: hf-rfid inspect {output}")
    hf_rfid.check_model(compressed)


if __name__ == "__main__":
    main()
