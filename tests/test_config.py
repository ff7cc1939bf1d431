"""RFIDMoEConfig: defaults, validation of every field, JSON round trip, forward compatibility."""

from __future__ import annotations

import json
import logging

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_rfid
from hf_rfid import RFIDMoEConfig
from hf_rfid.config import FORMAT_VERSION


def test_defaults_are_the_best_measured_combination():
    """Chosen on model (b) (benchmarks/results/quality.md): frequency ranks, whitened SVD, refit, no residual."""
    config = RFIDMoEConfig()
    assert config.quant_method == "rfid_moe"
    assert (config.group_size, config.xi, config.residual_fraction) == (4, 0.8, 0.03)
    assert config.targets == ["gate", "up"]
    assert (config.allocation, config.whitening, config.refit_coefficients) == ("frequency", None, None)
    assert config.residual == "none" and config.exact_budget is True and config.effective_xi == 0.0
    calibrated, data_free = config.resolved(calibrated=True), config.resolved(calibrated=False)
    assert (calibrated.whitening, calibrated.refit_coefficients) == ("activation", True)
    assert (data_free.whitening, data_free.refit_coefficients) == ("none", False)
    assert config.format_version == FORMAT_VERSION


def test_paper_preset_is_the_literal_method():
    config = RFIDMoEConfig.paper(keep=0.6)
    assert (config.keep, config.group_size, config.xi, config.residual, config.residual_fraction) == (
        0.6,
        4,
        0.8,
        "hash",
        0.03,
    )
    assert config.exact_budget is False and config.whitening == "none" and config.targets == ["gate", "up"]


def test_json_round_trip_keeps_every_field():
    config = RFIDMoEConfig(keep=0.5, allocation="erank", group_size=2, targets="down", residual="blocks", seed=3)
    restored = RFIDMoEConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.to_dict() == config.to_dict()
    assert restored.effective_xi == 1.0


def test_targets_are_canonicalised():
    assert RFIDMoEConfig(targets=["down", "gate"]).targets == ["gate", "down"]


def test_unknown_fields_from_newer_versions_are_tolerated_and_kept(caplog):
    with caplog.at_level(logging.WARNING):
        config = RFIDMoEConfig.from_dict({"quant_method": "rfid_moe", "keep": 0.7, "future_switch": [1, 2]})
    assert config.future_switch == [1, 2]
    assert config.to_dict()["future_switch"] == [1, 2]
    assert "future_switch" in caplog.text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("keep", 0.0, r"keep must be in \(0, 1\]"),
        ("keep", 1.5, r"keep must be in \(0, 1\]"),
        ("keep", "half", "keep must be a finite number"),
        ("keep", float("nan"), "keep must be a finite number"),
        ("group_size", 0, "group_size must be an integer >= 1"),
        ("group_size", 2.5, "group_size must be an integer >= 1"),
        ("xi", -0.1, r"xi must be in \[0, 1\]"),
        ("xi", 1.2, r"xi must be in \[0, 1\]"),
        ("residual_fraction", -0.01, "residual_fraction must be >= 0"),
        ("residual_fraction", 0.6, "residual_fraction must be smaller than keep"),
        ("allocation", "random", "allocation must be one of rfid, uniform, frequency, erank"),
        ("residual", "lowrank", "residual must be one of hash, blocks, fit, none"),
        ("whitening", "yes", "whitening must be one of none, activation"),
        ("budget_scope", "model", "budget_scope must be one of layer, global"),
        ("targets", ["gate", "w1"], "targets must be a non-empty list"),
        ("targets", [], "targets must be a non-empty list"),
        ("erank_power", 3, "erank_power must be 1 or 2"),
        ("score_normalization", "l2", "score_normalization must be one of sum, max, minmax"),
        ("whitening_floor", 0.0, r"whitening_floor must be in \(0, 1\)"),
        ("exact_budget", "yes", "exact_budget must be true or false"),
        ("refit_coefficients", 1, "refit_coefficients must be true or false"),
        ("min_expert_tokens", -1, "min_expert_tokens must be an integer >= 0"),
        ("propagate", "both", "propagate must be one of compressed, original"),
        ("seed", -5, "seed must be an integer >= 0"),
    ],
)
def test_invalid_values_name_the_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=rf"RFIDMoEConfig\.{message}"):
        RFIDMoEConfig(**{"residual": "hash", field: value})


def test_residual_fraction_is_ignored_without_residual():
    config = RFIDMoEConfig(keep=0.3, residual="none", residual_fraction=0.5)
    assert config.effective_residual_fraction == 0.0


def test_newer_format_version_is_refused():
    with pytest.raises(ValueError, match="format version 99.*Upgrade hf-rfid"):
        RFIDMoEConfig(format_version=99)


def test_foreign_quant_method_is_refused():
    with pytest.raises(ValueError, match="quant_method must be 'rfid_moe'"):
        RFIDMoEConfig(quant_method="gptq")


def test_registration_is_idempotent():
    hf_rfid.register()
    hf_rfid.register()
    assert hf_rfid.is_registered()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["rfid_moe"] is RFIDMoEConfig
    assert AUTO_QUANTIZER_MAPPING["rfid_moe"] is hf_rfid.RFIDMoEHfQuantizer


def test_modules_to_not_convert_matches_prefixes():
    config = RFIDMoEConfig(modules_to_not_convert=["model.layers.1"])
    assert not config.is_convertible("model.layers.1.mlp.experts")
    assert config.is_convertible("model.layers.10.mlp.experts")
