"""The model-patching layer: factorised experts, residual projections and architecture adapters."""

from .adapters import SUPPORTED_MODEL_TYPES, ExpertsLayout, UnsupportedModelError, find_experts_modules
from .experts import FactorizedExperts, FactorizedLayout, LowRankSpec

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ExpertsLayout",
    "FactorizedExperts",
    "FactorizedLayout",
    "LowRankSpec",
    "UnsupportedModelError",
    "find_experts_modules",
]
