"""`RFIDMoEConfig`: every switch of the RFID-MoE method, stored in `config.json` as `quantization_config`."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

logger = logging.getLogger(__name__)

QUANT_METHOD = "rfid_moe"
FORMAT_VERSION = 1
"""Version of the checkpoint layout written by this release. Newer checkpoints are refused at load time."""

MATRIX_TYPES = ("gate", "up", "down")
ALLOCATIONS = ("rfid", "uniform", "frequency", "erank")
SCORE_NORMALIZATIONS = ("sum", "max", "minmax")
BUDGET_SCOPES = ("layer", "global")
WHITENINGS = ("none", "activation")
RESIDUALS = ("hash", "blocks", "fit", "none")
PROPAGATIONS = ("compressed", "original")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"RFIDMoEConfig.{field} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"RFIDMoEConfig.{field} must be a finite number; got {value!r}")
    return float(value)


def _integer(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"RFIDMoEConfig.{field} must be an integer >= {minimum}; got {value!r}")
    return value


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"RFIDMoEConfig.{field} must be true or false; got {value!r}")
    return value


class RFIDMoEConfig(QuantizationConfigMixin):
    """Configuration of an RFID-MoE compression, saved as `quantization_config` (`quant_method="rfid_moe"`).

    The compressor reads the method switches; the loader reads `format_version` and `compressed_modules`
    (the factor shapes themselves come from the checkpoint's tensors). Every value is validated when the config is
    created, so a bad switch fails before any work starts.

    The defaults are the best combination measured on real pretrained weights (benchmarks/results/quality.md, model
    (b)): ranks by routing frequency, activation-whitened group SVD, refitted coefficients, no residual.
    `RFIDMoEConfig.paper()` is the method exactly as the paper describes it (weight-only SVD, `xi=0.8`, hash
    residual); at the same size it is far worse on real weights. `whitening` and `refit_coefficients` default to
    `None`: on when the compression has calibration data, off for a data-free compression (which warns); the saved
    config records the values used.

    Args:
        keep: Fraction of the compressed matrices' parameters that is stored, in (0, 1]. Includes the residual codes.
        allocation: How ranks are distributed over expert groups: `"rfid"` (fused score of effective rank and routing
            frequency, weighted by `xi`), `"uniform"` (same rank for every group), `"frequency"` (`xi=0`) or
            `"erank"` (`xi=1`).
        group_size: Experts per frequency-sorted group that share one low-rank basis (paper: 4). 1 gives
            per-expert SVD.
        xi: Weight of the effective rank against the routing frequency in the fused score, in [0, 1] (paper: 0.8).
        erank_power: 2 computes the effective rank from the energy spectrum s^2 (the paper), 1 from s (Roy-Vetterli).
        score_normalization: How effective ranks and frequencies are normalised before fusion: `"sum"`, `"max"` or
            `"minmax"`.
        budget_scope: `"layer"` gives every (layer, matrix type) the same kept fraction; `"global"` pools the budget
            of a matrix type over all layers.
        exact_budget: Hand the ranks lost to flooring to the largest remainders so the stored size hits the budget;
            `False` reproduces the paper's floor formula, which undershoots.
        targets: Expert matrices to compress, a subset of `gate`, `up`, `down` (paper: gate and up).
        whitening: `"activation"` factorises W S with S from the input Gram of the tokens routed to the group
            (SVD-LLM style); `"none"` is the data-free weight SVD; `None` (default): `"activation"` when calibration
            data is given, else `"none"`.
        whitening_floor: Relative eigenvalue floor of the input Gram used for whitening, in (0, 1).
        refit_coefficients: After the group SVD, refit every expert's coefficients for the shared basis by least
            squares on its own routed calibration inputs (an hf-rfid addition; needs calibration data). `None`
            (default): on when calibration data is given.
        residual: How part of the SVD residual is reconstructed: `"hash"` (seeded one-hot projection, the paper's
            reading), `"blocks"` (contiguous column blocks per row), `"fit"` (block codes fitted to calibration
            activations) or `"none"`.
        residual_fraction: Share of the original parameters spent on residual codes (paper: 0.03); it is taken out of
            the low-rank budget, so it must be smaller than `keep`.
        min_expert_tokens: An expert (or group) with fewer routed calibration tokens uses weight-only statistics.
        propagate: Feed each layer's calibration inputs through the `"compressed"` or the `"original"` earlier layers.
            `budget_scope="global"` needs every layer's statistics before any layer is compressed, so it always
            calibrates on the original model.
        seed: Seed of everything random (calibration windows, hash projections).
        modules_to_not_convert: Experts modules (full names or name prefixes) left dense.
        compressed_modules: Set by the compressor: the experts modules that hold factors.
        format_version: Checkpoint layout version (set by the library).
    """

    def __init__(
        self,
        keep: float = 0.6,
        allocation: str = "frequency",
        group_size: int = 4,
        xi: float = 0.8,
        erank_power: int = 2,
        score_normalization: str = "sum",
        budget_scope: str = "layer",
        exact_budget: bool = True,
        targets: list[str] | tuple[str, ...] | str = ("gate", "up"),
        whitening: str | None = None,
        whitening_floor: float = 1e-6,
        refit_coefficients: bool | None = None,
        residual: str = "none",
        residual_fraction: float = 0.03,
        min_expert_tokens: int = 16,
        propagate: str = "compressed",
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        compressed_modules: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str | None = None,
        **kwargs: Any,
    ) -> None:
        if quant_method not in (None, QUANT_METHOD):
            raise ValueError(f"RFIDMoEConfig.quant_method must be {QUANT_METHOD!r}; got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = _integer("format_version", format_version, 1)
        self.keep = keep
        self.allocation = allocation
        self.group_size = group_size
        self.xi = xi
        self.erank_power = erank_power
        self.score_normalization = score_normalization
        self.budget_scope = budget_scope
        self.exact_budget = exact_budget
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.whitening = whitening
        self.whitening_floor = whitening_floor
        self.refit_coefficients = refit_coefficients
        self.residual = residual
        self.residual_fraction = residual_fraction
        self.min_expert_tokens = min_expert_tokens
        self.propagate = propagate
        self.seed = seed
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.compressed_modules = list(compressed_modules) if compressed_modules is not None else None
        unknown = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        if unknown:
            logger.warning(
                "RFIDMoEConfig: keeping unknown field(s) %s as they are (written by a newer hf-rfid?)",
                ", ".join(sorted(unknown)),
            )
        for key, value in unknown.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise `ValueError` naming the field and its allowed range."""
        keep = _number("keep", self.keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"RFIDMoEConfig.keep must be in (0, 1]; got {self.keep!r}")
        _choice("allocation", self.allocation, ALLOCATIONS)
        _integer("group_size", self.group_size, 1)
        xi = _number("xi", self.xi)
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f"RFIDMoEConfig.xi must be in [0, 1]; got {self.xi!r}")
        if self.erank_power not in (1, 2) or isinstance(self.erank_power, bool):
            raise ValueError(f"RFIDMoEConfig.erank_power must be 1 or 2; got {self.erank_power!r}")
        _choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        _choice("budget_scope", self.budget_scope, BUDGET_SCOPES)
        _boolean("exact_budget", self.exact_budget)
        if (
            not self.targets
            or any(t not in MATRIX_TYPES for t in self.targets)
            or len(set(self.targets)) != len(self.targets)
        ):
            raise ValueError(
                f"RFIDMoEConfig.targets must be a non-empty list of distinct names from {', '.join(MATRIX_TYPES)}; "
                f"got {self.targets!r}"
            )
        self.targets = [t for t in MATRIX_TYPES if t in self.targets]
        if self.whitening is not None:
            _choice("whitening", self.whitening, WHITENINGS)
        floor = _number("whitening_floor", self.whitening_floor)
        if not 0.0 < floor < 1.0:
            raise ValueError(f"RFIDMoEConfig.whitening_floor must be in (0, 1); got {self.whitening_floor!r}")
        if self.refit_coefficients is not None:
            _boolean("refit_coefficients", self.refit_coefficients)
        _choice("residual", self.residual, RESIDUALS)
        fraction = _number("residual_fraction", self.residual_fraction)
        if fraction < 0.0:
            raise ValueError(f"RFIDMoEConfig.residual_fraction must be >= 0; got {self.residual_fraction!r}")
        if self.residual != "none" and fraction >= keep:
            raise ValueError(
                f"RFIDMoEConfig.residual_fraction must be smaller than keep ({keep}) because the residual codes are "
                f"taken out of the kept budget; got {self.residual_fraction!r}"
            )
        _integer("min_expert_tokens", self.min_expert_tokens, 0)
        _choice("propagate", self.propagate, PROPAGATIONS)
        _integer("seed", self.seed, 0)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses hf-rfid format version {self.format_version}, but the installed hf-rfid reads "
                f"versions up to {FORMAT_VERSION}. Upgrade hf-rfid (pip install -U hf-rfid)."
            )

    @classmethod
    def paper(cls, **overrides: Any) -> RFIDMoEConfig:
        """RFID-MoE exactly as the paper describes it (as far as it is known): weight-only group SVD of gate and up,
        groups of 4, xi = 0.8, a 3 % hash residual, and the literal floor formula (which undershoots the budget)."""
        settings: dict[str, Any] = {
            "allocation": "rfid",
            "group_size": 4,
            "xi": 0.8,
            "erank_power": 2,
            "score_normalization": "sum",
            "budget_scope": "layer",
            "exact_budget": False,
            "targets": ["gate", "up"],
            "whitening": "none",
            "refit_coefficients": False,
            "residual": "hash",
            "residual_fraction": 0.03,
        }
        return cls(**{**settings, **overrides})

    @property
    def effective_xi(self) -> float:
        """The fusion weight the allocation actually uses (`frequency` forces 0, `erank` forces 1)."""
        return {"frequency": 0.0, "erank": 1.0}.get(self.allocation, float(self.xi))

    @property
    def effective_residual_fraction(self) -> float:
        """Residual share of the budget: 0 when `residual="none"`."""
        return 0.0 if self.residual == "none" else float(self.residual_fraction)

    @property
    def needs_activations(self) -> bool:
        """Whether the options use calibration activations (not only routing counts) when data is given."""
        return self.whitening != "none" or self.residual == "fit" or self.refit_coefficients is not False

    @property
    def requires_calibration(self) -> bool:
        """Whether options were explicitly set that cannot work data-free."""
        return self.whitening == "activation" or self.residual == "fit" or self.refit_coefficients is True

    def resolved(self, calibrated: bool) -> RFIDMoEConfig:
        """A copy with the `None` (automatic) switches decided: on with calibration data, off without."""
        settings = self.to_dict()
        if self.whitening is None:
            settings["whitening"] = "activation" if calibrated else "none"
        if self.refit_coefficients is None:
            settings["refit_coefficients"] = calibrated
        return type(self)(**settings)

    def is_convertible(self, module_name: str) -> bool:
        """Whether the experts module `module_name` may be compressed (not listed in `modules_to_not_convert`)."""
        for skip in self.modules_to_not_convert or []:
            if module_name == skip or module_name.startswith(skip.rstrip(".") + "."):
                return False
        return True

    def get_loading_attributes(self) -> dict[str, Any]:
        """Nothing can be overridden at load time: the factors define the model."""
        return {}
