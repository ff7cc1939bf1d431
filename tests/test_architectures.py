"""Every supported architecture: exact full-rank factorisation, exact save -> load, dequantize, budget, format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import ARCHITECTURES, save_tiny, tiny_inputs, tiny_model
from transformers import AutoModelForCausalLM

import hf_rfid
from hf_rfid import FactorizedExperts, RFIDCompressor, RFIDMoEConfig, factorize_experts
from hf_rfid.modeling import ExpertsLayout, find_experts_modules

FORBIDDEN_LEAVES = {"gate_up_proj", "down_proj", "gate_proj", "up_proj", "w1", "w2", "w3"}


def _full_rank(module: torch.nn.Module, groups: list[list[int]]) -> dict[str, list[int]]:
    info = ExpertsLayout.of(module)
    return {t: [min(len(g) * info.shape(t)[0], info.shape(t)[1]) for g in groups] for t in info.matrix_types}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_full_rank_factorisation_reproduces_experts_and_logits(model_type):
    model = tiny_model(model_type)
    inputs = tiny_inputs()
    reference = model(inputs).logits
    groups = [[0, 3, 5], [1, 2], [4, 6, 7]]  # uneven groups, every matrix type compressed
    for name, experts in find_experts_modules(model):
        hidden = torch.randn(10, ExpertsLayout.of(experts).hidden_size)
        top_k_index = torch.randint(0, 8, (10, 2))
        top_k_weights = torch.rand(10, 2)
        expected = experts(hidden, top_k_index, top_k_weights)
        factorized, errors = factorize_experts(experts, groups, _full_rank(experts, groups))
        got = factorized(hidden, top_k_index, top_k_weights)
        assert isinstance(factorized, FactorizedExperts)
        assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max())
        assert max(max(e) for e in errors.values()) < 1e-5
        model.set_submodule(name, factorized)
    logits = model(inputs).logits
    assert (logits - reference).abs().max() < 2e-5 * max(1.0, reference.abs().max())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_compress_save_load_is_bit_identical(model_type, tmp_path):
    model = tiny_model(model_type)
    inputs = tiny_inputs()
    compressed = RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(model, show_progress=False)
    expected = compressed(inputs).logits
    compressed.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert any(isinstance(m, FactorizedExperts) for m in loaded.modules())
    assert torch.equal(loaded(inputs).logits, expected)
    state, loaded_state = compressed.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_dequantize_gives_a_plain_dense_model(model_type, tmp_path):
    model = tiny_model(model_type)
    inputs = tiny_inputs()
    compressed = RFIDCompressor(RFIDMoEConfig(keep=0.5, residual="hash")).compress(model, show_progress=False)
    expected = compressed(inputs).logits
    compressed.save_pretrained(tmp_path / "compressed")
    dense = hf_rfid.from_pretrained(tmp_path / "compressed").dequantize()
    assert not any(isinstance(m, FactorizedExperts) for m in dense.modules())
    # the compressed model's push_to_hub / report go with the factors: a dense model publishes like any other
    assert not {"push_to_hub", "rfid_report", "rfid_tokenizer"} & set(vars(dense))
    assert (dense(inputs).logits - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())
    dense.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded(inputs).logits, dense(inputs).logits)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_stored_parameters_hit_the_budget(model_type, keep):
    model = tiny_model(model_type)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=keep, residual="none"))
    compressor.compress(model, show_progress=False)
    for layer in compressor.report["layers"]:
        groups = layer["groups"]
        for matrix in layer["matrices"].values():
            out_features, in_features = matrix["shape"]
            budget = keep * matrix["original_parameters"]
            largest_unit = max(len(g) * out_features + in_features for g in groups)
            assert budget - len(groups) * largest_unit <= matrix["stored_parameters"] <= budget + 1e-6
    totals = compressor.report["totals"]
    assert abs(totals["kept_fraction"] - keep) < 0.1
    assert 0 < totals["moe_reduction"] < 1 and 0 < totals["model_reduction"] < totals["moe_reduction"]
    assert totals["model_parameters_after"] == sum(p.numel() for p in model.parameters())


def test_save_format_is_neutral_versioned_safetensors(tmp_path):
    model = tiny_model("mixtral")
    RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(model, show_progress=False).save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files and not list(tmp_path.glob("*.bin"))
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata()["rfid_format"] == "1"
        keys = list(handle.keys())
    expert_keys = [k for k in keys if ".experts." in k]
    assert expert_keys
    for key in expert_keys:
        after_experts = key.split(".experts.", 1)[1].split(".")
        assert not FORBIDDEN_LEAVES & set(after_experts), key
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "rfid_moe" and config["keep"] == 0.6
    assert config["compressed_modules"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_heterogeneous_ranks_within_a_layer_round_trip(tmp_path):
    model = tiny_model("qwen3_moe")
    for name, experts in find_experts_modules(model):
        groups = [[e] for e in range(8)]
        ranks = {"gate": [1, 2, 3, 5, 8, 13, 21, 32], "up": [32, 16, 8, 4, 2, 1, 1, 1]}
        factorized, _ = factorize_experts(experts, groups, ranks)
        model.set_submodule(name, factorized)
    RFIDCompressor(RFIDMoEConfig())._attach(model, [n for n, _ in find_experts_modules(model)])
    model.save_pretrained(tmp_path)
    loaded = hf_rfid.from_pretrained(tmp_path)
    experts = loaded.model.layers[0].mlp.experts
    assert [b.weight.shape[0] for b in experts.gate.bases] == [1, 2, 3, 5, 8, 13, 21, 32]
    assert torch.equal(loaded(tiny_inputs()).logits, model(tiny_inputs()).logits)


def test_sharded_checkpoint_dtype_auto_and_device_map(tmp_path):
    model = tiny_model("deepseek_v3", dtype=torch.bfloat16)
    compressed = RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(model, show_progress=False)
    compressed.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = hf_rfid.from_pretrained(tmp_path, dtype="auto", device_map="cpu")
    assert loaded.model.layers[1].mlp.experts.gate.bases[0].weight.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(loaded(tiny_inputs()).logits, reference(tiny_inputs()).logits)
    as_float = hf_rfid.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_float.model.layers[1].mlp.experts.gate.bases[0].weight.dtype == torch.float32


def test_saved_dense_checkpoint_round_trip_through_cli_compress(tmp_path):
    source = save_tiny("olmoe", tmp_path / "dense")
    compressed = RFIDCompressor.from_pretrained(source, keep=0.5).quantize(tmp_path / "out")
    loaded = hf_rfid.from_pretrained(compressed)
    assert (compressed / "rfid_report.json").exists() and (compressed / "README.md").exists()
    assert (compressed / "tokenizer.json").exists()
    assert isinstance(loaded.model.layers[0].mlp.experts, FactorizedExperts)
