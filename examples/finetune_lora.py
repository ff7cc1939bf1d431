"""Recover quality after compression with LoRA: compress, fine-tune with transformers' Trainer, merge, save.

    python examples/finetune_lora.py                          # the bundled trained MoE, keep 0.4 (little to recover)
    python examples/finetune_lora.py --model smollm2-moe --keep 0.6 --steps 40 --batch-size 4 --seq-len 256

Trains on the wiki_vital_en train split (../shared/data when present, else the bundled calibration excerpt), reports
perplexity on the held-out text before and after, merges the adapter into the factors (ranks unchanged) and saves an
rfid_moe checkpoint that reloads with identical logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_rfid
import hf_rfid.peft
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.calibration import build_windows, load_documents
from hf_rfid.compress.writer import save_compressed
from hf_rfid.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "wiki_vital_en"


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _model_dir(name: str) -> Path:
    if name == "tiny":
        return REPO / "assets" / "tiny-moe"
    if name == "smollm2-moe":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from moefy import build_moe

        return Path(build_moe())
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-moe, or a dense MoE directory")
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--output", default="/tmp/hf-rfid-lora")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = _model_dir(args.model)
    output = Path(args.output)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_text = SHARED / "train.txt" if SHARED.exists() else REPO / "assets" / "data" / "wiki_calibration.txt"
    heldout = SHARED / "test.txt" if SHARED.exists() else REPO / "assets" / "data" / "wiki_heldout.txt"

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dense_ppl = perplexity(model, tokenizer, heldout, max_tokens=args.eval_tokens)["perplexity"]
    compressor = RFIDCompressor(RFIDMoEConfig(keep=args.keep))
    compressor.compress(model, train_text, tokenizer=tokenizer, num_samples=32, seq_len=args.seq_len)
    save_compressed(model, output / "compressed", tokenizer=tokenizer, report=compressor.report, overwrite=True)

    compressed = hf_rfid.from_pretrained(output / "compressed", dtype=torch.float32)
    before = perplexity(compressed, tokenizer, heldout, max_tokens=args.eval_tokens)["perplexity"]
    num_windows = args.steps * args.batch_size  # one epoch over fresh windows
    windows = build_windows(load_documents(train_text), tokenizer, num_windows, args.seq_len, seed=1).input_ids
    wrapped = hf_rfid.peft.get_peft_model(
        compressed,
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    trainer = Trainer(
        model=wrapped,
        args=TrainingArguments(
            output_dir=str(output / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        ),
        train_dataset=_Windows(windows),
    )
    tick = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - tick
    wrapped.eval()
    after = perplexity(wrapped, tokenizer, heldout, max_tokens=args.eval_tokens)["perplexity"]
    wrapped.save_pretrained(output / "adapter")
    merged = wrapped.merge_and_unload()
    save_compressed(merged, output / "merged", tokenizer=tokenizer, report=compressor.report, overwrite=True)
    reloaded = hf_rfid.from_pretrained(output / "merged", dtype=torch.float32)
    ids = tokenizer("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = float((reloaded(ids).logits - merged(ids).logits).abs().max())
    result = {
        "model": str(model_dir),
        "keep": args.keep,
        "steps": args.steps,
        "tokens_trained": num_windows * args.seq_len,
        "lora_rank": args.rank,
        "trainable_parameters": trainable,
        "train_seconds": train_seconds,
        "heldout": str(heldout),
        "eval_tokens": args.eval_tokens,
        "perplexity": {"dense": dense_ppl, "compressed": before, "compressed_lora": after},
        "recovered_fraction": (before - after) / (before - dense_ppl) if before > dense_ppl else None,
        "merged_reload_max_abs_logit_difference": difference,
    }
    (output / "finetune_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
