"""Bad input: corrupt or newer checkpoints, unsupported models, and loading without `import hf_rfid`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_inputs, tiny_model
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_rfid
from hf_rfid import (
    CheckpointFormatError,
    NotLoadedWithHfRfidError,
    RFIDCompressor,
    RFIDMoEConfig,
    UnsupportedModelError,
)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("qwen2_moe")
    RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(model, show_progress=False).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(directory, edit, metadata=None):
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        old_metadata = handle.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata or old_metadata)


def test_missing_factor_tensor_is_named(checkpoint):
    key = "model.layers.1.mlp.experts.up.coefficients.5.weight"
    _rewrite(checkpoint, lambda t: t.pop(key))
    with pytest.raises(CheckpointFormatError, match=f"missing tensor {key}"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_missing_group_map_of_a_compressed_module_is_named(checkpoint):
    key = "model.layers.0.mlp.experts.expert_group"
    _rewrite(checkpoint, lambda t: t.pop(key))
    with pytest.raises(CheckpointFormatError, match=f"missing tensor {key}"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_misshaped_basis_is_named(checkpoint):
    key = "model.layers.0.mlp.experts.gate.bases.1.weight"
    _rewrite(checkpoint, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0], 63)))
    with pytest.raises(CheckpointFormatError, match=rf"tensor {key} has shape \[\d+, 63\]; expected \[rank, 64\]"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_rank_larger_than_the_matrix_is_refused_before_allocating(checkpoint):
    basis = "model.layers.0.mlp.experts.gate.bases.0.weight"

    _rewrite(checkpoint, lambda t: t.__setitem__(basis, torch.zeros(10_000, 64)))
    with pytest.raises(CheckpointFormatError, match=rf"tensor {basis} has shape \[10000, 64\].*1 <= rank <= 64"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_coefficient_rank_must_match_its_group_basis(checkpoint):
    key = "model.layers.1.mlp.experts.gate.coefficients.2.weight"
    _rewrite(checkpoint, lambda t: t.__setitem__(key, torch.zeros(32, t[key].shape[1] + 1)))
    with pytest.raises(CheckpointFormatError, match=f"tensor {key} has shape"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_unexpected_tensor_in_experts_is_named(checkpoint):
    key = "model.layers.0.mlp.experts.gate_up_proj"
    _rewrite(checkpoint, lambda t: t.__setitem__(key, torch.zeros(8, 64, 64)))
    with pytest.raises(CheckpointFormatError, match=f"unexpected tensor {key}"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_newer_format_in_safetensors_metadata_is_refused(checkpoint):
    _rewrite(checkpoint, lambda t: None, metadata={"format": "pt", "rfid_format": "7"})
    with pytest.raises(CheckpointFormatError, match="format version 7.*Upgrade hf-rfid"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_newer_format_in_config_is_refused(checkpoint):
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 2.*Upgrade hf-rfid"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_pytorch_bin_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "model.safetensors.bak")
    tensors = load_file(str(checkpoint / "model.safetensors.bak"))
    torch.save(tensors, checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors.bak").unlink()
    with pytest.raises((CheckpointFormatError, OSError), match="safetensors"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def _llama4_config():
    return transformers.Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
    )


@pytest.mark.parametrize(
    ("build", "model_type", "reason"),
    [
        (lambda: transformers.Llama4ForCausalLM(_llama4_config()), "llama4_text", "pre-routed"),
        (
            lambda: transformers.DbrxForCausalLM(
                transformers.DbrxConfig(
                    d_model=32,
                    n_heads=2,
                    n_layers=1,
                    vocab_size=64,
                    ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 1},
                    attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
                )
            ),
            "dbrx",
            "2-D flattened",
        ),
        (
            lambda: transformers.JetMoeForCausalLM(
                transformers.JetMoeConfig(
                    vocab_size=64,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_key_value_heads=2,
                    kv_channels=8,
                    intermediate_size=16,
                    num_local_experts=4,
                    num_experts_per_tok=1,
                )
            ),
            "jetmoe",
            "parallel experts",
        ),
        (
            lambda: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                )
            ),
            "llama",
            None,
        ),
    ],
)
def test_unsupported_models_get_a_clear_error(build, model_type, reason):
    model = build()
    with pytest.raises(UnsupportedModelError) as error:
        RFIDCompressor(RFIDMoEConfig()).compress(model, show_progress=False)
    message = str(error.value)
    assert f"model type {model_type!r}" in message and "mixtral" in message and "gpt_oss" in message
    if reason:
        assert reason in message


def test_data_dependent_options_need_calibration():
    model = tiny_model("mixtral")
    for settings in ({"whitening": "activation"}, {"residual": "fit"}, {"refit_coefficients": True}):
        with pytest.raises(ValueError, match="need calibration data"):
            RFIDCompressor(RFIDMoEConfig(**settings)).compress(model, show_progress=False)


def test_automatic_switches_follow_the_data_and_are_recorded():
    compressor = RFIDCompressor(RFIDMoEConfig())  # whitening / refit: None, i.e. on with data, off without
    with pytest.warns(UserWarning, match="data-free and weight-only"):
        model = compressor.compress(tiny_model("mixtral"), show_progress=False)
    saved = model.config.quantization_config
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    assert (saved["whitening"], saved["refit_coefficients"]) == ("none", False)
    assert compressor.report["config"]["whitening"] == "none"
    assert compressor.config.whitening is None  # the compressor keeps the automatic switch for the next run
    calibrated = compressor.compress(tiny_model("mixtral"), tiny_inputs(batch=4, length=32), show_progress=False)
    saved = calibrated.config.quantization_config
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    assert (saved["whitening"], saved["refit_coefficients"]) == ("activation", True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        compressor.compress(tiny_model("mixtral"), batch_size=0)


def test_too_small_budget_is_explained():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="cannot hold rank 1 for all .* groups.*raise keep"):
        RFIDCompressor(RFIDMoEConfig(keep=0.02, residual="none")).compress(model, show_progress=False)


def test_loading_without_import_is_detected(checkpoint, caplog):
    config_entry = AUTO_QUANTIZATION_CONFIG_MAPPING.pop("rfid_moe")
    quantizer_entry = AUTO_QUANTIZER_MAPPING.pop("rfid_moe")
    try:
        with caplog.at_level(logging.WARNING):
            silent = AutoModelForCausalLM.from_pretrained(checkpoint)  # what a user without `import hf_rfid` gets
        assert not hf_rfid.is_registered()
        with pytest.raises(NotLoadedWithHfRfidError, match="loaded without hf-rfid.*import hf_rfid"):
            hf_rfid.check_model(silent)
        loaded = hf_rfid.from_pretrained(checkpoint)  # registers again and checks strictly
        assert hf_rfid.is_registered()
        hf_rfid.check_model(loaded)
        assert not torch.equal(silent(tiny_inputs()).logits, loaded(tiny_inputs()).logits)
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["rfid_moe"] = config_entry
        AUTO_QUANTIZER_MAPPING["rfid_moe"] = quantizer_entry
