"""Reading factor shapes from a checkpoint before loading, and the strict `from_pretrained` wrapper.

The checkpoint itself defines the factorised structure: the shapes of `bases` / `coefficients` / `residual.codes`
come from the safetensors headers, and the expert-to-group map from the small `expert_group` tensor. Everything is
checked against the model's config before a single weight is allocated, so a truncated, foreign or newer
checkpoint fails with an error that names the tensor instead of loading a half-random model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import FORMAT_VERSION, QUANT_METHOD, RFIDMoEConfig
from .modeling.adapters import ExpertsLayout, find_experts_modules
from .modeling.experts import FactorizedExperts, FactorizedLayout, LowRankSpec
from .modeling.residual import selected_columns_count

METADATA_KEY = "rfid_format"

_FACTOR_KEY = re.compile(
    r"^(?:expert_group|bias_gate_up|bias_down"
    r"|(?P<type>gate|up|down)\.(?:dense|bases\.(?P<g>\d+)\.weight|coefficients\.(?P<e>\d+)\.weight"
    r"|residual\.(?:codes|seeds|columns)))$"
)


class CheckpointFormatError(ValueError):
    """A compressed checkpoint is incomplete, inconsistent with its config, or from a newer hf-rfid."""


class NotLoadedWithHfRfidError(RuntimeError):
    """An `rfid_moe` checkpoint was loaded without hf-rfid's quantizer (its experts are random)."""


def _weight_renamings(model: nn.Module) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def _checkpoint_tensors(model: nn.Module, checkpoint_files: Iterable[str]) -> dict[str, tuple[str, str, list[int]]]:
    """Model-side key -> (file, checkpoint key, shape) for every tensor, after the model's renamings."""
    from transformers.core_model_loading import apply_renamings

    renamings = _weight_renamings(model)
    prefix = getattr(model, "base_model_prefix", "")
    tensors = {}
    for file in checkpoint_files:
        with safe_open(file, framework="pt") as handle:
            version = (handle.metadata() or {}).get(METADATA_KEY)
            if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
                raise CheckpointFormatError(
                    f"{Path(file).name} was written with hf-rfid format version {version}; the installed hf-rfid "
                    f"reads versions up to {FORMAT_VERSION}. Upgrade hf-rfid (pip install -U hf-rfid)."
                )
            for key in handle.keys():  # noqa: SIM118  (safe_open is not iterable)
                name = apply_renamings(key, renamings)
                if prefix and name.startswith(prefix + ".") and not hasattr(model, prefix):
                    name = name[len(prefix) + 1 :]
                tensors[name] = (file, key, list(handle.get_slice(key).get_shape()))
    return tensors


def _read_tensor(location: tuple[str, str, list[int]]) -> torch.Tensor:
    file, key, _ = location
    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key)


def _layout_of_module(
    name: str, info: ExpertsLayout, entries: dict[str, tuple[str, str, list[int]]], residual_kind: str
) -> FactorizedLayout:
    """Validate one experts module's factor tensors and return its layout."""

    def full(suffix: str) -> str:
        return f"{name}.{suffix}"

    def require(suffix: str, shape: list[int] | None = None, ndim: int = 2) -> list[int]:
        if suffix not in entries:
            raise CheckpointFormatError(f"missing tensor {full(suffix)} in the compressed checkpoint")
        found = entries[suffix][2]
        if shape is None and len(found) != ndim:
            raise CheckpointFormatError(f"tensor {full(suffix)} has shape {found}, expected {ndim} dimensions")
        if shape is not None and found != shape:
            raise CheckpointFormatError(f"tensor {full(suffix)} has shape {found}, expected {shape}")
        return found

    for suffix in entries:
        if not _FACTOR_KEY.match(suffix):
            raise CheckpointFormatError(f"unexpected tensor {full(suffix)} in a factorised experts module")
    require("expert_group", [info.num_experts])
    expert_group = _read_tensor(entries["expert_group"])
    if expert_group.dtype not in (torch.int64, torch.int32):
        raise CheckpointFormatError(f"tensor {full('expert_group')} must hold integers, found {expert_group.dtype}")
    groups = expert_group.tolist()
    num_groups = max(groups) + 1
    if min(groups) < 0 or sorted(set(groups)) != list(range(num_groups)):
        raise CheckpointFormatError(f"tensor {full('expert_group')} must number the groups 0..G-1 without gaps")
    group_sizes = [groups.count(g) for g in range(num_groups)]
    layout = FactorizedLayout(expert_group=groups, residual_kind=residual_kind)
    for matrix_type in info.matrix_types:
        out_features, in_features = info.shape(matrix_type)
        if f"{matrix_type}.dense" in entries:
            require(f"{matrix_type}.dense", [info.num_experts, out_features, in_features])
            continue
        ranks = []
        for group in range(num_groups):
            rank, columns = require(f"{matrix_type}.bases.{group}.weight")
            limit = min(group_sizes[group] * out_features, in_features)
            if columns != in_features or not 1 <= rank <= limit:
                raise CheckpointFormatError(
                    f"tensor {full(f'{matrix_type}.bases.{group}.weight')} has shape {[rank, columns]}; expected "
                    f"[rank, {in_features}] with 1 <= rank <= {limit}"
                )
            ranks.append(rank)
        for expert, group in enumerate(groups):
            require(f"{matrix_type}.coefficients.{expert}.weight", [out_features, ranks[group]])
        residual_dim = 0
        if f"{matrix_type}.residual.codes" in entries:
            if residual_kind == "none":
                raise CheckpointFormatError(
                    f"tensor {full(f'{matrix_type}.residual.codes')} present but residual='none'"
                )
            rows, residual_dim = require(f"{matrix_type}.residual.codes")
            bad_blocks = residual_kind in ("blocks", "fit") and residual_dim % out_features != 0
            if rows != info.num_experts or not 1 <= residual_dim <= out_features * in_features or bad_blocks:
                raise CheckpointFormatError(
                    f"tensor {full(f'{matrix_type}.residual.codes')} has an invalid shape {[rows, residual_dim]}"
                )
            if residual_kind == "hash":
                require(f"{matrix_type}.residual.seeds", [num_groups])
            if residual_kind == "fit":
                selected = selected_columns_count(residual_dim, out_features, in_features)
                require(f"{matrix_type}.residual.columns", [num_groups, selected])
                columns = _read_tensor(entries[f"{matrix_type}.residual.columns"])
                distinct = all(len(set(row)) == len(row) for row in columns.tolist())
                if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= in_features or not distinct):
                    raise CheckpointFormatError(f"tensor {full(f'{matrix_type}.residual.columns')} is out of range")
        layout.lowrank[matrix_type] = LowRankSpec(ranks=ranks, residual_dim=residual_dim)
    if info.has_bias:
        fused_in = (2 if info.has_gate else 1) * info.intermediate_size
        require("bias_gate_up", [info.num_experts, fused_in])
        require("bias_down", [info.num_experts, info.hidden_size])
    return layout


def read_factorized_layouts(
    model: nn.Module, checkpoint_files: Iterable[str], config: RFIDMoEConfig
) -> dict[str, FactorizedLayout]:
    """Layouts of every factorised experts module in the checkpoint, validated against the model."""
    tensors = _checkpoint_tensors(model, checkpoint_files)
    layouts = {}
    for name, experts in find_experts_modules(model):
        entries = {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + ".")}
        if "expert_group" not in entries:
            if config.compressed_modules is not None and name in config.compressed_modules:
                raise CheckpointFormatError(f"missing tensor {name}.expert_group in the compressed checkpoint")
            continue
        layouts[name] = _layout_of_module(name, ExpertsLayout.of(experts), entries, config.residual)
    if not layouts:
        raise CheckpointFormatError("the checkpoint says quant_method='rfid_moe' but holds no factorised experts")
    return layouts


def replace_experts(model: nn.Module, layouts: dict[str, FactorizedLayout]) -> None:
    """Swap each listed experts module for an empty `FactorizedExperts` of the given layout."""
    for name, layout in layouts.items():
        model.set_submodule(name, FactorizedExperts(model.get_submodule(name), layout))


def is_rfid_config(quantization_config: Any) -> bool:
    """Whether a config's `quantization_config` (object or raw dict) is an RFID-MoE one."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method") == QUANT_METHOD
    return getattr(quantization_config, "quant_method", None) == QUANT_METHOD


def check_model(model: nn.Module) -> None:
    """Raise `NotLoadedWithHfRfidError` if `model` comes from an `rfid_moe` checkpoint but has no factorised experts.

    transformers only logs a warning for an unknown `quant_method`, then builds the dense architecture with
    randomly initialised experts. This catches that case, e.g. a model loaded before `import hf_rfid`.
    """
    config = getattr(model, "config", None)
    if not is_rfid_config(getattr(config, "quantization_config", None)):
        return
    factorized = [m for m in model.modules() if isinstance(m, FactorizedExperts)]
    if not factorized:
        raise NotLoadedWithHfRfidError(
            "this model comes from an hf-rfid (quant_method='rfid_moe') checkpoint but was loaded without hf-rfid: "
            "its experts are randomly initialised. Run `import hf_rfid` before `from_pretrained`, or load it with "
            "`hf_rfid.from_pretrained(...)`."
        )
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            raise NotLoadedWithHfRfidError(f"parameter {name} was never loaded (still on the meta device)")


def from_pretrained(pretrained_model_name_or_path: str | Path, *, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a compressed (or plain) model like `AutoModelForCausalLM.from_pretrained`, strictly.

    Registers hf-rfid with transformers first, then refuses a result with missing, unexpected or mismatched keys, or
    experts that were not factorised. `model_class` defaults to `AutoModelForCausalLM`; other keyword arguments go to
    `from_pretrained` unchanged (`dtype`, `device_map`, `revision`, `token`, ...).
    """
    from .quantizer import register

    register()
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model, info = model_class.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise CheckpointFormatError(
            f"loading {pretrained_model_name_or_path} was not exact: {json.dumps(problems)[:2000]}"
        )
    check_model(model)
    return model
