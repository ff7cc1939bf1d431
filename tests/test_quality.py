"""Quality on a real (trained) MoE: the bundled small OLMoE compressed with RFID defaults at keep 0.6.

The bound comes from the measured quality table (benchmarks/results/quality_tiny.md): RFID at keep 0.6 stays within
BOUND of the dense perplexity on held-out text that neither training nor calibration saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_rfid
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.writer import save_compressed
from hf_rfid.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "tiny-moe"
HELDOUT = REPO / "assets" / "data" / "wiki_heldout.txt"
CALIBRATION = REPO / "assets" / "data" / "wiki_calibration.txt"
BOUND = 1.02  # compressed perplexity <= 1.02 x dense (measured: see the module docstring)


@pytest.mark.slow
def test_rfid_defaults_keep_perplexity_close_to_dense(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    try:
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        dense = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        dense_ppl = perplexity(dense, tokenizer, HELDOUT, max_tokens=16384)["perplexity"]
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6))
        compressor.compress(model, CALIBRATION, tokenizer=tokenizer, num_samples=32, seq_len=512, show_progress=False)
        save_compressed(model, tmp_path / "rfid", tokenizer=tokenizer, report=compressor.report)
        compressed = hf_rfid.from_pretrained(tmp_path / "rfid", dtype=torch.float32)
        compressed_ppl = perplexity(compressed, tokenizer, HELDOUT, max_tokens=16384)["perplexity"]
    finally:
        torch.set_num_threads(threads)
    assert abs(compressor.report["totals"]["kept_fraction"] - 0.6) < 0.01
    assert dense_ppl < compressed_ppl <= BOUND * dense_ppl, (dense_ppl, compressed_ppl)
