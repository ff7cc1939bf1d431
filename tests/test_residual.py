"""Sparse-projection residuals: P^T P = I, bucket means, fast apply without a dense residual, fitted codes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.calibration import prepare_calibration
from hf_rfid.compress.factorize import encode_residual
from hf_rfid.modeling import ExpertsLayout, find_experts_modules
from hf_rfid.modeling.residual import (
    BlockProjection,
    HashProjection,
    fft_friendly_size,
    seeded_permutation,
)


def _dense_projection(projection) -> torch.Tensor:
    """The explicit P (out*in x D) of a projection, for checking only."""
    index = projection.bucket_index().reshape(-1)
    matrix = torch.zeros(index.numel(), projection.code_dim, dtype=torch.float64)
    matrix[torch.arange(index.numel()), index] = 1.0
    return matrix / projection.counts().sqrt()


PROJECTIONS = [
    HashProjection(6, 10, 7, seed=3),
    HashProjection(5, 8, 40, seed=1),  # one position per bucket: lossless
    BlockProjection.contiguous(4, 10, 3),
    BlockProjection.selected(4, 10, torch.tensor([7, 2])),
]


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["hash", "hash-full", "blocks", "selected"])
def test_projection_is_one_hot_with_orthonormal_columns(projection):
    dense = _dense_projection(projection)
    assert ((dense != 0).sum(dim=1) == 1).all()
    assert torch.allclose(dense.T @ dense, torch.eye(projection.code_dim, dtype=torch.float64))


def test_hash_codes_are_scaled_bucket_sums_and_decode_to_bucket_means():
    projection = HashProjection(3, 4, 5, seed=11)
    residual = torch.arange(12, dtype=torch.float64).reshape(1, 3, 4) ** 1.5
    index = projection.bucket_index()
    codes = projection.encode(residual)[0]
    decoded = projection.decode(codes[None])[0]
    for bucket in range(5):
        members = residual[0][index == bucket]
        assert codes[bucket] == pytest.approx(float(members.sum()) / len(members) ** 0.5)
        assert torch.allclose(decoded[index == bucket], members.mean().expand(len(members)))
    # 12 positions into 5 buckets: sizes 3, 3, 2, 2, 2 (the linear-index bijection spreads them evenly)
    assert projection.counts().tolist() == [3.0, 3.0, 2.0, 2.0, 2.0]
    assert sorted(torch.bincount(index.reshape(-1)).tolist()) == [2, 2, 2, 3, 3]


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["hash", "hash-full", "blocks", "selected"])
def test_fast_apply_equals_the_dense_residual(projection):
    torch.manual_seed(0)
    code = torch.randn(projection.code_dim, dtype=torch.float64)
    inputs = torch.randn(9, projection.in_features, dtype=torch.float64)
    dense = projection.decode(code[None])[0]
    assert torch.allclose(projection.apply(inputs, code), inputs @ dense.T, atol=1e-10)
    assert torch.allclose(projection.apply(inputs.float(), code.float()).double(), inputs @ dense.T, atol=1e-4)


def test_hash_with_one_position_per_bucket_is_lossless():
    projection = HashProjection(5, 8, 40, seed=1)
    residual = torch.randn(2, 5, 8, dtype=torch.float64)
    assert torch.allclose(projection.decode(projection.encode(residual)), residual)


def test_seeded_permutation_is_portable_and_seed_dependent():
    assert seeded_permutation(10, 42).tolist() == [3, 2, 9, 5, 8, 1, 4, 0, 7, 6]  # fixed across platforms
    assert sorted(seeded_permutation(1000, 7).tolist()) == list(range(1000))
    assert not torch.equal(seeded_permutation(50, 1), seeded_permutation(50, 2))


def test_fft_friendly_sizes():
    assert [fft_friendly_size(n) for n in (1, 7, 61, 97, 1000)] == [1, 6, 60, 96, 1000]


def test_fitted_codes_minimise_the_output_error_on_given_inputs():
    torch.manual_seed(0)
    projection = BlockProjection.selected(6, 12, torch.tensor([3, 8, 0]))
    residual = torch.randn(6, 12, dtype=torch.float64)
    inputs = torch.randn(200, 12, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    gram = inputs.T @ inputs

    def output_error(code: torch.Tensor) -> float:
        return float((inputs @ (residual - projection.decode(code[None])[0]).T).norm())

    fitted = encode_residual(projection, residual, gram)
    means = encode_residual(projection, residual)
    assert output_error(fitted) < output_error(means)
    for _ in range(5):  # a local minimum: any perturbation is worse
        assert output_error(fitted) <= output_error(fitted + 1e-3 * torch.randn_like(fitted))


def _expert_inputs(model, calibration):
    inputs, hooks = {}, []
    for name, experts in find_experts_modules(model):

        def hook(module, args, name=name):
            hidden, index = args[0], args[1]
            for expert in range(module.num_experts):
                inputs.setdefault((name, expert), []).append(hidden[(index == expert).any(-1)])

        hooks.append(experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(calibration.input_ids)
    for handle in hooks:
        handle.remove()
    return {key: torch.cat(value).double() for key, value in inputs.items()}


def _output_error(original, compressed, inputs) -> float:
    numerator = denominator = 0.0
    for name, experts in find_experts_modules(compressed):
        approximations = experts.materialize()
        weights = ExpertsLayout.of(original.get_submodule(name)).read_matrices(original.get_submodule(name))
        for matrix_type in experts.compressed_types:
            for expert in range(experts.num_experts):
                x = inputs[(name, expert)]
                weight = weights[matrix_type][expert].double()
                numerator += float(((x @ (weight - approximations[matrix_type][expert].double()).T) ** 2).sum())
                denominator += float(((x @ weight.T) ** 2).sum())
    return (numerator / denominator) ** 0.5


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_fit_residual_lowers_output_error_against_none_at_the_same_size(model_type, calibration_file):
    calibration = prepare_calibration(calibration_file, tiny_tokenizer(), 16, 64, seed=0)
    original = tiny_model(model_type)
    inputs = _expert_inputs(original, calibration)
    errors, sizes = {}, {}
    for residual in ("none", "fit"):
        model = tiny_model(model_type)
        # weight-only group SVD (the paper's setting): with whitening, extra rank beats the residual at equal size
        config = RFIDMoEConfig.paper(keep=0.6, residual=residual, residual_fraction=0.1, exact_budget=True)
        compressor = RFIDCompressor(config)
        compressor.compress(model, {"input_ids": calibration.input_ids}, show_progress=False)
        errors[residual] = _output_error(original, model, inputs)
        sizes[residual] = compressor.report["totals"]["stored_compressed_parameters"]
    budget = 0.6 * compressor.report["totals"]["original_compressed_parameters"]
    assert sizes["fit"] <= budget and sizes["none"] <= budget
    assert abs(sizes["fit"] - sizes["none"]) < 0.02 * budget
    assert errors["fit"] < 0.95 * errors["none"], errors


def test_residual_codes_and_seeds_reload_exactly(tmp_path, calibration_file):
    for residual in ("hash", "blocks", "fit"):
        model = tiny_model("qwen3_moe")
        config = RFIDMoEConfig(keep=0.6, residual=residual, residual_fraction=0.1)
        RFIDCompressor(config).compress(
            model, calibration_file, tokenizer=tiny_tokenizer(), num_samples=8, seq_len=64, show_progress=False
        )
        model.save_pretrained(tmp_path / residual)
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / residual)
        for name, experts in find_experts_modules(model):
            other = loaded.get_submodule(name)
            assert torch.equal(experts.gate.residual.codes, other.gate.residual.codes)
            for buffer in ("seeds", "columns"):
                if hasattr(experts.gate.residual, buffer):
                    assert torch.equal(getattr(experts.gate.residual, buffer), getattr(other.gate.residual, buffer))
