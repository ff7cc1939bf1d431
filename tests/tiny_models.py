"""Tiny random MoE models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers

VOCAB_SIZE = 320
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _config(model_type: str) -> transformers.PretrainedConfig:
    if model_type == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            norm_topk_prob=False,
        )
    if model_type == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
        )
    if model_type == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if model_type == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **{**COMMON, "num_hidden_layers": 3},
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            topk_method="group_limited_greedy",
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    if model_type == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3},
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    if model_type == "phimoe":
        return transformers.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "granitemoe":
        return transformers.GraniteMoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "gpt_oss":
        return transformers.GptOssConfig(
            **COMMON,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        )
    if model_type == "qwen3_next":
        return transformers.Qwen3NextConfig(
            **{**COMMON, "num_hidden_layers": 4},
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=32,
            head_dim=16,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            decoder_sparse_step=1,
        )
    raise KeyError(model_type)


ARCHITECTURES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "granitemoe",
    "gpt_oss",
    "qwen3_next",
]


def tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = False
) -> transformers.PreTrainedModel:
    """A randomly initialised tiny causal LM of `model_type` (eval mode, experts with visible structure)."""
    torch.manual_seed(seed)
    config = _config(model_type)
    config.tie_word_embeddings = tied
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # HF inits experts with std 0.02 on some types, 0 biases; make every expert distinct
        for name, parameter in model.named_parameters():
            if ".experts." in name or "router" in name or ".gate." in name:
                parameter.normal_(0.0, 0.2 if "router" in name or ".gate." in name else 0.1)
    return model.eval()


def tiny_inputs(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids for the tiny models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)


TEXT_FIXTURE = Path(__file__).parent / "data" / "tiny_corpus.txt"


@lru_cache(maxsize=1)
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 300 tokens trained on the committed text fixture (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(TEXT_FIXTURE)], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def save_tiny(
    model_type: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = False
) -> Path:
    """Save a tiny dense model of `model_type` with the tiny tokenizer; return the directory."""
    tiny_model(model_type, seed=seed, dtype=dtype, tied=tied).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
