"""LoRA (PEFT) on compressed models, and fine-tuning the factors themselves.

Use these helpers instead of PEFT's directly:

* `get_peft_model(model, lora_config=None)` and `from_pretrained(model, adapter_dir)` wrap PEFT's own functions in
  `rfid_peft_guard()`. On transformers 5, PEFT rewrites the LoRA targets of MoE model types for the v4 -> v5 experts
  layout (`gate_proj` -> fused `gate_up_proj` parameters, regexes widened to bare leaf names). On a factorised model
  that drops or misplaces LoRA layers, and reloads a saved adapter onto the wrong modules without any error. The guard
  switches that rewrite off while PEFT builds or loads the adapter.
* The default targets are the attention projections and every basis / coefficient layer of the factorised experts.
  Per-module ranks go through `LoraConfig(rank_pattern=...)` as usual.
* `model.add_adapter(...)` (transformers' own adapter API) needs PEFT >= 0.22 and still runs the rewrite; it is not the
  way with this stack. `peft.prepare_model_for_kbit_training` casts every bf16 factor to float32 (doubling memory)
  and is meant for int8/int4 layers; hf-rfid factors are ordinary float layers, so it is not needed: use
  `model.gradient_checkpointing_enable()` and, with reentrant checkpointing, `model.enable_input_require_grads()`.
* `freeze_all_but_factors(model)` trains the factors and residual codes directly (no adapter); the quantizer reports
  `is_qat_trainable`, so transformers' `Trainer` accepts it.

`merge_and_unload()` folds a LoRA on `bases.<g>` / `coefficients.<e>` into those layers, so the merged model keeps its
ranks and still saves as an `rfid_moe` checkpoint.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .modeling.experts import FactorizedExperts, LowRankExpertMatrices

FACTOR_PATTERN = re.compile(r".*\.experts\.(gate|up|down)\.(bases|coefficients)\.\d+$")
ATTENTION_PATTERN = re.compile(r".*\.(self_attn|attention|attn)\.[A-Za-z_]*proj[A-Za-z_]*$")


@contextlib.contextmanager
def rfid_peft_guard() -> Iterator[None]:
    """Disable PEFT's transformers-v5 MoE target and state-dict rewriting while building or loading an adapter."""
    from unittest import mock

    import peft.utils.transformers_weight_conversion as conversion

    with (
        mock.patch.object(conversion, "convert_peft_config_for_transformers", lambda *args, **kwargs: None),
        mock.patch.object(
            conversion,
            "convert_peft_adapter_state_dict_for_transformers",
            lambda model, peft_config, adapter_state_dict, adapter_name="default": adapter_state_dict,
        ),
    ):
        yield


def default_target_modules(model: nn.Module, attention: bool = True, factors: bool = True) -> list[str]:
    """Full names of the `nn.Linear` layers hf-rfid targets by default: attention projections and expert factors."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if (factors and FACTOR_PATTERN.match(name)) or (attention and ATTENTION_PATTERN.match(name)):
            names.append(name)
    if factors and not any(FACTOR_PATTERN.match(n) for n in names):
        raise ValueError("the model has no factorised experts: compress it (or load it after `import hf_rfid`) first")
    return names


def get_peft_model(model: nn.Module, lora_config: Any = None, **kwargs: Any) -> Any:
    """`peft.get_peft_model` for a compressed model, with hf-rfid's default targets and the rewrite guard.

    `lora_config` defaults to `LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")`; when its
    `target_modules` is unset, the attention projections and all factor layers are targeted.
    """
    import peft

    if lora_config is None:
        lora_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
    if lora_config.target_modules is None and not getattr(lora_config, "target_parameters", None):
        lora_config.target_modules = default_target_modules(model)
    with rfid_peft_guard():
        return peft.get_peft_model(model, lora_config, **kwargs)


def from_pretrained(model: nn.Module, adapter: str | Path, **kwargs: Any) -> Any:
    """`peft.PeftModel.from_pretrained` (a local directory or Hub id) under the rewrite guard."""
    import peft

    with rfid_peft_guard():
        return peft.PeftModel.from_pretrained(model, str(adapter), **kwargs)


def freeze_all_but_factors(model: nn.Module, residual: bool = True) -> int:
    """Make only the factor layers (bases, coefficients) and residual codes trainable; return that parameter count."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = 0
    for module in model.modules():
        if not isinstance(module, FactorizedExperts):
            continue
        for matrix_type in module.compressed_types:
            matrices: LowRankExpertMatrices = getattr(module, matrix_type)
            parameters = [*matrices.bases.parameters(), *matrices.coefficients.parameters()]
            if residual and matrices.residual is not None:
                parameters.append(matrices.residual.codes)
            for parameter in parameters:
                parameter.requires_grad_(True)
                trainable += parameter.numel()
    if not trainable:
        raise ValueError("the model has no factorised experts to train")
    return trainable
