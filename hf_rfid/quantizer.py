"""`RFIDMoEHfQuantizer`: lets `from_pretrained` rebuild factorised experts, and its registration with transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .compress.writer import REPORT_FILE
from .config import FORMAT_VERSION, QUANT_METHOD, RFIDMoEConfig
from .hub import bind_push_to_hub
from .loading import METADATA_KEY, CheckpointFormatError, read_factorized_layouts, replace_experts
from .modeling.adapters import HUB_KERNEL_MODEL_TYPES, check_supported
from .modeling.experts import FactorizedExperts

logger = logging.getLogger(__name__)


class RFIDMoEHfQuantizer(HfQuantizer):
    """transformers quantizer for `quant_method="rfid_moe"` checkpoints written by `RFIDCompressor`.

    Before weights are loaded it replaces every factorised `<block>.experts` with a `FactorizedExperts` whose factor
    shapes are read from the checkpoint, so the standard loader fills them with no missing or unexpected key.
    Compressing happens in `RFIDCompressor`, not at load time (`requires_calibration=True`).
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("distributed_config") is not None or kwargs.get("tp_plan") is not None:
            raise ValueError("hf-rfid checkpoints do not support tensor or expert parallel loading yet")

    def update_parallel_plan(self, model: nn.Module, plan: dict[str, str] | None) -> None:
        if plan:
            for key in [key for key in plan if ".experts" in key]:
                del plan[key]

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, use_kernels: bool = False, **kwargs: Any
    ) -> nn.Module:
        model_type = check_supported(model)
        if use_kernels and model_type in HUB_KERNEL_MODEL_TYPES:
            raise ValueError(f"use_kernels=True would replace the factorised {model_type} experts; load without it")
        if not checkpoint_files:
            raise CheckpointFormatError("an rfid_moe model can only be loaded from its safetensors checkpoint files")
        bad = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
        if bad:
            raise CheckpointFormatError(f"rfid_moe checkpoints are safetensors only; got {bad[0]}")
        layouts = read_factorized_layouts(model, checkpoint_files, self.quantization_config)
        replace_experts(model, layouts)
        self._report_file = Path(checkpoint_files[0]).parent / REPORT_FILE
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in model.named_modules():
            if isinstance(module, FactorizedExperts):
                expected = [list(members) for members in module._group_members]
                module.refresh_groups()
                if module._group_members != expected:
                    raise CheckpointFormatError(f"{name}.expert_group changed while loading")
        _align_cpu_tensors(model)
        report_file = getattr(self, "_report_file", None)
        if report_file is not None and report_file.is_file():
            model.rfid_report = json.loads(report_file.read_text(encoding="utf-8"))
        bind_push_to_hub(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        return None, {METADATA_KEY: str(FORMAT_VERSION)}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model, dtype)

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


_ALIGNMENT = 64


def _align_cpu_tensors(model: nn.Module) -> None:
    """Copy CPU tensors that safetensors mapped at unaligned addresses into owned, 64-byte aligned memory.

    CPU BLAS kernels take different code paths (and summation orders) for unaligned operands, so without this a
    reloaded model's logits can differ from the in-memory model's in the last bit although every weight is equal.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `FactorizedExperts` by the original experts module holding A B (+ residual), in place.

    The result is a plain dense model: the hf-rfid `push_to_hub`, report and tokenizer attached to compressed models
    are removed, so publishing it does not carry a compressed model's card or report.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, FactorizedExperts):
            model.set_submodule(name, module.to_dense(dtype))
    for attribute in ("push_to_hub", "rfid_report", "rfid_tokenizer"):
        model.__dict__.pop(attribute, None)
    return model


def register() -> None:
    """Register `RFIDMoEConfig` and `RFIDMoEHfQuantizer` with transformers under `rfid_moe` (idempotent).

    transformers' `register_*` functions raise on a second registration; a re-imported (reloaded) hf-rfid replaces
    the stale classes instead.
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RFIDMoEConfig)
    elif AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is not RFIDMoEConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = RFIDMoEConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RFIDMoEHfQuantizer)
    elif AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is not RFIDMoEHfQuantizer:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = RFIDMoEHfQuantizer


def is_registered() -> bool:
    """Whether transformers currently knows `quant_method="rfid_moe"`."""
    return (
        AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is RFIDMoEConfig
        and AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is RFIDMoEHfQuantizer
    )
