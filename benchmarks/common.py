"""Shared pieces of the benchmarks: where the models and texts are, the method table, a round-to-nearest quantiser."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUNDLED_CALIBRATION = REPO / "assets" / "data" / "wiki_calibration.txt"
BUNDLED_HELDOUT = REPO / "assets" / "data" / "wiki_heldout.txt"
TINY_MOE = REPO / "assets" / "tiny-moe"
RESULTS = REPO / "benchmarks" / "results"

sys.path.insert(0, str(REPO / "benchmarks"))

# name -> RFIDMoEConfig overrides (keep is added per run). Everything shares the budget accounting of hf-rfid and the
# exact budget (the paper's floor formula undershoots, which would flatter nobody). "rfid" is what users get.
WEIGHT_ONLY = {"whitening": "none", "refit_coefficients": False, "residual": "none"}
PAPER = {"allocation": "rfid", "xi": 0.8, "whitening": "none", "refit_coefficients": False, "residual": "hash"}
METHODS: dict[str, dict] = {
    "rfid": {},
    "rfid-no-refit": {"refit_coefficients": False},
    "rfid+fit-residual": {"residual": "fit"},
    "rfid-paper": PAPER,
    "rfid-paper-no-residual": {**PAPER, "residual": "none"},
    "rfid-paper-blocks": {**PAPER, "residual": "blocks"},
    "rfid-paper-fit": {**PAPER, "residual": "fit"},
    "rfid-paper-whitened-refit": {**PAPER, "residual": "none", "whitening": "activation", "refit_coefficients": True},
    "uniform-groups": {**WEIGHT_ONLY, "allocation": "uniform"},
    "frequency": {**WEIGHT_ONLY, "allocation": "frequency"},
    "erank": {**WEIGHT_ONLY, "allocation": "erank"},
    "svd-per-expert": {**WEIGHT_ONLY, "group_size": 1, "allocation": "uniform"},
    "svd-llm-per-expert": {**WEIGHT_ONLY, "group_size": 1, "allocation": "uniform", "whitening": "activation"},
    "uniform-groups-whitened-refit": {"allocation": "uniform"},
}
METHOD_NOTES = {
    "rfid": "hf-rfid defaults: groups of 4, ranks by routing frequency, whitened group SVD, refitted coefficients",
    "rfid-no-refit": "defaults without the coefficient refit",
    "rfid+fit-residual": "defaults + data-fitted selected-column residual (3 % of the budget)",
    "rfid-paper": "RFID-MoE as the paper describes it: weight-only group SVD, xi=0.8, hash residual (3 %)",
    "rfid-paper-no-residual": "the paper's allocation without residual",
    "rfid-paper-blocks": "the paper's method with a contiguous-block residual (3 %)",
    "rfid-paper-fit": "the paper's method with a data-fitted selected-column residual (3 %)",
    "rfid-paper-whitened-refit": "the paper's xi=0.8 allocation on whitened group SVD with refitted coefficients",
    "uniform-groups": "groups of 4 sharing a basis, same rank for every group, weight-only",
    "frequency": "allocation by routing frequency only (xi=0), weight-only",
    "erank": "allocation by effective rank only (xi=1), weight-only",
    "svd-per-expert": "plain truncated SVD of every expert (no sharing), weight-only",
    "svd-llm-per-expert": "activation-whitened SVD per expert (SVD-LLM style)",
    "uniform-groups-whitened-refit": "defaults with the same rank for every group (isolates the allocation)",
}


def eval_sets(quick: bool = False) -> dict[str, Path]:
    """Held-out texts: the shared test splits when present, else the bundled held-out excerpt."""
    names = ["wiki_vital_en"] if quick else ["wiki_vital_en", "brown", "sotu"]
    found = {name: SHARED_DATA / name / "test.txt" for name in names if (SHARED_DATA / name / "test.txt").exists()}
    return found or {"wiki_heldout": BUNDLED_HELDOUT}


def calibration_text() -> Path:
    """Calibration text: the shared wiki train split when present, else the bundled excerpt."""
    shared = SHARED_DATA / "wiki_vital_en" / "train.txt"
    return shared if shared.exists() else BUNDLED_CALIBRATION


def smollm_moe_dir() -> Path:
    """Model (b): SmolLM2-135M MoEfied, built on first use into the cache by benchmarks/moefy.py."""
    from moefy import build_moe

    return Path(build_moe())


def set_threads() -> int:
    """Use every core (the benchmarks run alone)."""
    threads = int(os.environ.get("HF_RFID_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round-to-nearest quantisation (returns the dequantised weight).

    `weight` is (..., out, in); one scale per output row, levels -2^(b-1) .. 2^(b-1) - 1.
    """
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / levels
    quantised = torch.clamp(torch.round(weight.float() / scale), -levels - 1, levels)
    return (quantised * scale).to(weight.dtype)


@torch.no_grad()
def quantise_experts(model: nn.Module, bits: int, targets: tuple[str, ...] = ("gate", "up")) -> dict[str, float]:
    """RTN-quantise the given expert matrices of a dense fused-experts model in place; return the byte accounting."""
    from hf_rfid.modeling import ExpertsLayout, find_experts_modules

    params = 0
    rows = 0
    for _, experts in find_experts_modules(model):
        info = ExpertsLayout.of(experts)
        fused = experts.gate_up_proj
        transposed = info.is_transposed
        # per-output-channel rows of gate and up: rows of (E, 2I, H) or columns of the transposed (E, H, 2I)
        view = fused.transpose(1, 2) if transposed else fused
        quantised = round_to_nearest(view, bits)
        if set(targets) != {"gate", "up"}:
            raise ValueError("the RTN baseline quantises gate and up together")
        fused.copy_(quantised.transpose(1, 2) if transposed else quantised)
        params += view.numel()
        rows += view.shape[0] * view.shape[1]
    return {"parameters": params, "bytes": params * bits / 8 + rows * 2}


@torch.no_grad()
def quantise_factors(model: nn.Module, bits: int) -> dict[str, float]:
    """RTN-quantise every factor layer (bases, coefficients) and residual code row of a compressed model in place."""
    from hf_rfid.modeling import FactorizedExperts

    params = 0
    rows = 0
    for module in model.modules():
        if not isinstance(module, FactorizedExperts):
            continue
        for matrix_type in module.compressed_types:
            matrices = getattr(module, matrix_type)
            weights = [layer.weight for layer in (*matrices.bases, *matrices.coefficients)]
            if matrices.residual is not None:
                weights.append(matrices.residual.codes)
            for weight in weights:
                weight.copy_(round_to_nearest(weight, bits))
                params += weight.numel()
                rows += weight.shape[0]
    return {"parameters": params, "bytes": params * bits / 8 + rows * 2}
