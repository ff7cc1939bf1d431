"""Shared fixtures: tiny models of every architecture, their tokenizer, and calibration text."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import hf_rfid  # noqa: E402,F401  (registers the quantizer)
from tiny_models import TEXT_FIXTURE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "wiki_vital_en" / "train.txt"


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
        warnings.filterwarnings("ignore", message=".*no calibration data.*")
        yield


@pytest.fixture(scope="session")
def calibration_file() -> Path:
    """Real English text: the shared train split when present, else the committed fixture."""
    return SHARED_TRAIN if SHARED_TRAIN.exists() else TEXT_FIXTURE
