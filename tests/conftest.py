"""Shared fixtures: tiny models of every architecture, their tokenizer, and calibration text."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TEXT_FIXTURE

import hf_rfid  # noqa: F401  (registers the quantizer)

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "wiki_vital_en" / "train.txt"


# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes small ops up to 400x slower when
# the cores are shared with other processes. Tests that run a real model raise the thread count themselves.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
        warnings.filterwarnings("ignore", message=".*no calibration data.*")
        yield


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    """Real English text: 300 KB of the shared wiki train split when present, else the committed fixture."""
    if not SHARED_TRAIN.exists():
        return TEXT_FIXTURE
    excerpt = tmp_path_factory.mktemp("calibration") / "wiki_train_excerpt.txt"
    text = SHARED_TRAIN.read_text(encoding="utf-8")[:300_000]
    excerpt.write_text(text[: text.rfind("\n\n")], encoding="utf-8")
    return excerpt
