"""Where the experts live in a transformers MoE model, and how their fused weights map to per-expert matrices.

All model-specific knowledge of hf-rfid is in this file. transformers 5.x stores routed experts fused at
`<block>.experts` as 3-D parameters `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`, flagged by
`@use_experts_implementation` (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`). One generic adapter
reads those flags; the registry below lists the architectures it is tested on and the few exceptions.

Canonical form used by the rest of the library: for each matrix type `gate`, `up`, `down` a stack
(E, out_features, in_features) in `nn.Linear` orientation, so expert e computes `x @ W[e].T`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE (shared expert left dense)",
    "qwen3_moe": "Qwen3-MoE",
    "olmoe": "OLMoE",
    "deepseek_v2": "DeepSeek-V2 (group-limited routing; dense first layers left as they are)",
    "deepseek_v3": "DeepSeek-V3 (sigmoid routing; shared experts left dense)",
    "phimoe": "Phi-MoE",
    "granitemoe": "Granite-MoE",
    "gpt_oss": "GPT-OSS (transposed, interleaved gate/up, biases)",
    "qwen3_next": "Qwen3-Next",
}
"""Model types whose experts the generic adapter handles and the test suite covers."""

UNSUPPORTED_REASONS: dict[str, str] = {
    "llama4": "Llama4 experts take pre-routed (E*T, H) inputs through a bmm over all experts",
    "llama4_text": "Llama4 experts take pre-routed (E*T, H) inputs through a bmm over all experts",
    "dbrx": "DBRX stores its experts as 2-D flattened (E*I, H) matrices",
    "jetmoe": "JetMoE uses parallel experts in the MLP and in attention",
}
"""Known MoE architectures with a different experts layout, refused with a reason."""

HUB_KERNEL_MODEL_TYPES = frozenset({"gpt_oss"})
"""Architectures whose whole MoE block can be swapped for a Hub kernel that reads the fused expert weights."""

EXPERTS_SUFFIX = "experts"


class UnsupportedModelError(ValueError):
    """The model is not an MoE architecture hf-rfid supports."""


def model_type_of(model: nn.Module) -> str:
    """The `model_type` of a transformers model (of its text part for multimodal configs)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config; hf-rfid needs a HF model")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text_config, "model_type", getattr(config, "model_type", "unknown")))


def check_supported(model: nn.Module) -> str:
    """Return the model type, or raise `UnsupportedModelError` naming it and the supported list."""
    model_type = model_type_of(model)
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    reason = UNSUPPORTED_REASONS.get(model_type)
    detail = f" ({reason})" if reason else ""
    raise UnsupportedModelError(
        f"hf-rfid does not support model type {model_type!r}{detail}. Supported MoE model types: {supported}."
    )


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its weights."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool

    @property
    def matrix_types(self) -> tuple[str, ...]:
        """The per-expert matrices this module has, in canonical order."""
        return ("gate", "up", "down") if self.has_gate else ("up", "down")

    def shape(self, matrix_type: str) -> tuple[int, int]:
        """(out_features, in_features) of one expert's matrix of this type."""
        if matrix_type == "down":
            return self.hidden_size, self.intermediate_size
        return self.intermediate_size, self.hidden_size

    @classmethod
    def of(cls, experts: nn.Module) -> ExpertsLayout:
        """Read the layout of a transformers fused experts module."""
        has_gate = bool(getattr(experts, "has_gate", True))
        transposed = bool(getattr(experts, "is_transposed", False))
        in_name = "gate_up_proj" if has_gate else "up_proj"
        fused_in, fused_out = getattr(experts, in_name, None), getattr(experts, "down_proj", None)
        if not isinstance(fused_in, torch.Tensor) or not isinstance(fused_out, torch.Tensor):
            raise UnsupportedModelError(
                f"{type(experts).__name__} has no fused 3-D `{in_name}` / `down_proj` parameters"
            )
        if fused_in.dim() != 3 or fused_out.dim() != 3:
            raise UnsupportedModelError(f"{type(experts).__name__} expert weights are not 3-D")
        num_experts = fused_in.shape[0]
        hidden, inter = (fused_out.shape[2], fused_out.shape[1]) if transposed else fused_out.shape[1:]
        return cls(
            num_experts=int(num_experts),
            hidden_size=int(hidden),
            intermediate_size=int(inter),
            has_gate=has_gate,
            has_bias=bool(getattr(experts, "has_bias", False)),
            is_transposed=transposed,
            is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        )

    def split_fused(self, fused: torch.Tensor) -> list[torch.Tensor]:
        """Fused `gate_up` activations or rows (..., 2I) -> [gate (..., I), up (..., I)]."""
        if self.is_concatenated:
            return list(fused.chunk(2, dim=-1))
        return [fused[..., ::2], fused[..., 1::2]]

    def join_fused(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Inverse of `split_fused`: gate and up (..., I) -> fused (..., 2I) in this module's order."""
        if self.is_concatenated:
            return torch.cat([gate, up], dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)

    def read_matrices(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Per-type weight stacks (E, out, in) of a fused experts module (views where possible)."""
        if self.has_gate:
            fused = experts.gate_up_proj  # (E, 2I, H) or transposed (E, H, 2I)
            fused = fused if self.is_transposed else fused.transpose(1, 2)  # -> (E, H, 2I)
            gate, up = self.split_fused(fused)
            matrices = {"gate": gate.transpose(1, 2), "up": up.transpose(1, 2)}
        else:
            up = experts.up_proj
            matrices = {"up": up.transpose(1, 2) if self.is_transposed else up}
        down = experts.down_proj
        matrices["down"] = down.transpose(1, 2) if self.is_transposed else down
        return matrices

    def read_biases(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Output biases, `gate_up` (E, 2I, fused order) and `down` (E, H); empty without biases."""
        if not self.has_bias:
            return {}
        in_name = "gate_up_proj_bias" if self.has_gate else "up_proj_bias"
        return {"gate_up": getattr(experts, in_name), "down": experts.down_proj_bias}

    def write_dense(
        self, experts: nn.Module, matrices: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]
    ) -> None:
        """Fill a freshly built original experts module from per-type stacks (E, out, in) and biases."""
        if self.has_gate:
            fused = self.join_fused(matrices["gate"].transpose(1, 2), matrices["up"].transpose(1, 2))  # (E, H, 2I)
            targets = {"gate_up_proj": fused if self.is_transposed else fused.transpose(1, 2)}
        else:
            up = matrices["up"]
            targets = {"up_proj": up.transpose(1, 2) if self.is_transposed else up}
        down = matrices["down"]
        targets["down_proj"] = down.transpose(1, 2) if self.is_transposed else down
        if self.has_bias:
            targets["gate_up_proj_bias" if self.has_gate else "up_proj_bias"] = biases["gate_up"]
            targets["down_proj_bias"] = biases["down"]
        for name, value in targets.items():
            parameter = getattr(experts, name)
            if tuple(parameter.shape) != tuple(value.shape):
                raise ValueError(
                    f"cannot write {name}: expected shape {tuple(parameter.shape)}, got {tuple(value.shape)}"
                )
            setattr(experts, name, nn.Parameter(value.to(parameter.dtype).contiguous()))


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All fused routed-experts modules `<block>.experts` of a supported model, in model order.

    Raises `UnsupportedModelError` for an unsupported model type or a supported type without any experts module.
    Already factorised experts are returned too (they carry `is_factorized = True`).
    """
    model_type = check_supported(model)
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != EXPERTS_SUFFIX:
            continue
        if getattr(module, "is_factorized", False) or hasattr(module, "down_proj"):
            found.append((name, module))
    if not found:
        raise UnsupportedModelError(f"no routed experts module found in this {model_type!r} model")
    return found


def parent_block(model: nn.Module, experts_name: str) -> nn.Module:
    """The MoE block that owns `<block>.experts`."""
    return model.get_submodule(experts_name.rsplit(".", 1)[0])


def router_of(block: nn.Module) -> nn.Module:
    """The router of an MoE block (`gate` or `router`)."""
    for attribute in ("gate", "router"):
        router = getattr(block, attribute, None)
        if isinstance(router, nn.Module):
            return router
    raise UnsupportedModelError(f"{type(block).__name__} has no `gate` or `router` module")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and `ModuleList` of the decoder layers that contain the experts."""
    experts_names = [name for name, _ in find_experts_modules(model)]
    parts = experts_names[0].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut].isdigit():
            list_name = ".".join(parts[:cut])
            layers = model.get_submodule(list_name)
            if isinstance(layers, nn.ModuleList):
                return list_name, layers
    raise UnsupportedModelError("could not find the decoder layer list of this model")
