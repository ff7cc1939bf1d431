"""benchmarks/moefy.py on a tiny random Llama: the expert split is exact, the conversion runs and routes sparsely."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import moefy
from tiny_models import COMMON


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # the tiny models' geometry as a dense Llama, embeddings tied like SmolLM2's (moefy assumes it)
    config = LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, intermediate_size=64)
    return LlamaForCausalLM(config).eval()


def test_balanced_assign_fills_every_column_to_capacity():
    affinity = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    affinity[:, 0] += 10  # every row prefers column 0; capacity must still be respected
    assign = moefy.balanced_assign(affinity, capacity=6)
    assert sorted(assign.tolist()) == sorted([0, 1, 2, 3] * 6)
    groups = moefy.groups_from_assignment(assign, 4)
    assert torch.equal(groups.flatten().sort().values, torch.arange(24))


def test_exact_split_reproduces_the_dense_model(dense):
    """With every expert selected and uniform weights, the experts sum to the dense MLP (what --verify checks)."""
    groups = torch.randperm(64, generator=torch.Generator().manual_seed(1)).view(4, 16).sort(dim=1).values
    router = torch.zeros(4, COMMON["hidden_size"])
    moe = moefy.assemble_mixtral(
        dense, [(groups, router, layer.mlp.down_proj.weight) for layer in dense.model.layers], 4, 1.0
    )
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    assert moefy.verify_split(dense, moe, ids) < 1e-4
    assert torch.equal(
        moefy.recover_groups(
            dense.model.layers[0].mlp.gate_proj.weight, moe.model.layers[0].mlp.experts.gate_up_proj[:, :16]
        ),
        groups,
    )


def test_conversion_routes_sparsely_and_is_deterministic(dense):
    settings = moefy.MoefySettings(
        num_experts=4,
        top_k=2,
        seq_len=16,
        cluster_tokens=64,
        kmeans_iters=5,
        refine_rounds=1,
        router_tokens=64,
        router_iters=20,
    )
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    first = moefy.convert_layers(dense, calib, settings, log=lambda *_: None)
    second = moefy.convert_layers(dense, calib, settings, log=lambda *_: None)
    assert len(first) == 2
    for a, b in zip(first, second):
        assert torch.equal(a.groups, b.groups) and torch.equal(a.router, b.router) and torch.equal(a.down, b.down)
        assert a.groups.shape == (4, 16)
        assert torch.equal(a.groups.flatten().sort().values, torch.arange(64))  # a partition of the neurons
        stats = a.stats
        assert 0 <= stats["router_topk_accuracy"] <= 1
        assert stats["rel_error_routed_refit"] <= stats["rel_error_routed"] + 1e-6  # the refit never hurts
        assert abs(sum(stats["expert_load"]) - 1) < 1e-3

    moe = moefy.assemble_mixtral(dense, [(c.groups, c.router, c.down) for c in first], settings.top_k, 2.0)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    with torch.no_grad():
        logits = moe(calib).logits
    assert torch.isfinite(logits).all()
