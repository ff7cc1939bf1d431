"""`FactorizedExperts`: a drop-in replacement for a transformers fused experts module.

Per matrix type (`gate`, `up`, `down`) the module holds either the dense stack of the original (`DenseExpertMatrices`)
or `LowRankExpertMatrices`: per group of experts one basis `B_g` (K_g x in) and per expert its coefficients
`A_e` (out x K_g), plus optional residual codes. Expert e of group g computes `A_e (B_g x) + R_hat_e x`; the basis
product of gate and up is computed once per token per group and shared by the group's experts.

Checkpoint names (under `<block>.experts.`) are neutral, so transformers' fused-expert converters never touch them:

    expert_group                      (E,)      int64, group of each expert
    <type>.bases.<g>.weight           (K_g, in)
    <type>.coefficients.<e>.weight    (out, K_g(e))
    <type>.residual.codes             (E, D)
    <type>.residual.seeds             (G,)      int64, hash residual only
    <type>.residual.columns           (G, n)    int64, fit residual only (selected input columns)
    <type>.dense                      (E, out, in)  matrix types left dense
    bias_gate_up (E, 2I), bias_down (E, H)          experts with biases (GPT-OSS)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import ExpertsLayout
from .residual import ResidualProjection, make_projection, selected_columns_count


@dataclass
class LowRankSpec:
    """Shapes of one compressed matrix type: rank per group and residual code length per expert (0 = none)."""

    ranks: list[int]
    residual_dim: int = 0


@dataclass
class FactorizedLayout:
    """Everything needed to build an empty `FactorizedExperts` with exact shapes."""

    expert_group: list[int]
    lowrank: dict[str, LowRankSpec] = field(default_factory=dict)
    residual_kind: str = "none"

    @property
    def num_groups(self) -> int:
        """Number of expert groups."""
        return max(self.expert_group) + 1

    def members(self, group: int) -> list[int]:
        """Experts of `group`, in index order."""
        return [e for e, g in enumerate(self.expert_group) if g == group]


class DenseExpertMatrices(nn.Module):
    """An uncompressed matrix type: the original (E, out, in) stack."""

    def __init__(self, num_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def expert_forward(self, inputs: torch.Tensor, expert: int, group: int, shared: torch.Tensor | None = None):
        """Expert `expert`'s output for `inputs` (T, in) -> (T, out)."""
        return F.linear(inputs, self.dense[expert])

    def materialize(self) -> torch.Tensor:
        """The (E, out, in) weight stack."""
        return self.dense.detach()

    def stored_parameters(self) -> int:
        """Parameters held by this matrix type."""
        return self.dense.numel()


class ResidualCodes(nn.Module):
    """Residual codes (E, D) of one matrix type, with what defines each group's projection.

    `hash`: a seed per group (`seeds`, (G,)); `fit`: the selected input columns per group (`columns`, (G, n));
    `blocks`: nothing (contiguous blocks follow from the shapes).
    """

    def __init__(
        self, num_experts: int, code_dim: int, num_groups: int, kind: str, out_features: int, in_features: int
    ) -> None:
        super().__init__()
        self.kind, self.out_features, self.in_features = kind, out_features, in_features
        self.codes = nn.Parameter(torch.zeros(num_experts, code_dim))
        if kind == "hash":
            self.register_buffer("seeds", torch.zeros(num_groups, dtype=torch.int64))
        elif kind == "fit":
            selected = selected_columns_count(code_dim, out_features, in_features)
            self.register_buffer("columns", torch.zeros(num_groups, selected, dtype=torch.int64))
        self._projections: dict[int, tuple[tuple, ResidualProjection]] = {}

    def _definition_buffer(self) -> torch.Tensor | None:
        return getattr(self, "seeds", None) if self.kind == "hash" else getattr(self, "columns", None)

    def projection(self, group: int) -> ResidualProjection:
        """The projection shared by `group` (rebuilt only when its seed / columns buffer changes)."""
        buffer = self._definition_buffer()
        version = (buffer.data_ptr(), buffer._version) if buffer is not None else None
        cached = self._projections.get(group)
        if cached is None or cached[0] != version:
            seed = int(buffer[group]) if self.kind == "hash" else 0
            columns = buffer[group].clone() if self.kind == "fit" else None
            projection = make_projection(
                self.kind, self.out_features, self.in_features, self.codes.shape[1], seed, columns
            )
            cached = (version, projection)
            self._projections[group] = cached
        return cached[1]


class LowRankExpertMatrices(nn.Module):
    """A compressed matrix type: group-shared bases, per-expert coefficients, optional residual codes."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        expert_group: list[int],
        spec: LowRankSpec,
        residual_kind: str,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bases = nn.ModuleList(nn.Linear(in_features, rank, bias=False) for rank in spec.ranks)
        self.coefficients = nn.ModuleList(
            nn.Linear(spec.ranks[group], out_features, bias=False) for group in expert_group
        )
        self.residual = (
            ResidualCodes(
                len(expert_group), spec.residual_dim, len(spec.ranks), residual_kind, out_features, in_features
            )
            if spec.residual_dim > 0 and residual_kind != "none"
            else None
        )

    def project(self, inputs: torch.Tensor, group: int) -> torch.Tensor:
        """B_g x for the rows of `inputs`: (T, in) -> (T, K_g)."""
        return self.bases[group](inputs)

    def expert_forward(
        self, inputs: torch.Tensor, expert: int, group: int, shared: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A_e (B_g x) + R_hat_e x; `shared` is B_g x when the caller already has it."""
        projected = self.project(inputs, group) if shared is None else shared
        output = self.coefficients[expert](projected)
        if self.residual is not None:
            output = output + self.residual.projection(group).apply(inputs, self.residual.codes[expert])
        return output

    @torch.no_grad()
    def materialize(self, expert_group: Iterable[int]) -> torch.Tensor:
        """Dense weights A_e B_g + R_hat_e of every expert, (E, out, in) in float32 (for dequantising)."""
        weights = []
        for expert, group in enumerate(expert_group):
            weight = self.coefficients[expert].weight.float() @ self.bases[group].weight.float()
            if self.residual is not None:
                projection = self.residual.projection(group)
                weight = weight + projection.decode(self.residual.codes[expert : expert + 1].float())[0].float()
            weights.append(weight)
        return torch.stack(weights)

    def stored_parameters(self) -> int:
        """Parameters held: bases, coefficients and residual codes (seeds and group ids are metadata)."""
        total = sum(module.weight.numel() for module in (*self.bases, *self.coefficients))
        return total + (self.residual.codes.numel() if self.residual is not None else 0)


class FactorizedExperts(nn.Module):
    """Routed experts with low-rank group-shared factors; same forward signature as the module it replaces.

    `forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`. The original module's
    gating function (`_apply_gate`, e.g. GPT-OSS's clamped SwiGLU) and activation are reused unchanged.
    """

    is_factorized = True

    def __init__(self, original: nn.Module, layout: FactorizedLayout) -> None:
        super().__init__()
        self.layout_info = ExpertsLayout.of(original)
        info = self.layout_info
        if len(layout.expert_group) != info.num_experts:
            raise ValueError(f"expert_group has {len(layout.expert_group)} entries for {info.num_experts} experts")
        self.num_experts = info.num_experts
        self.original_class = type(original)
        self.config = getattr(original, "config", None)
        for attribute in ("has_gate", "has_bias", "is_transposed", "is_concatenated", "alpha", "limit"):
            if hasattr(original, attribute):
                setattr(self, attribute, getattr(original, attribute))
        if hasattr(original, "act_fn"):
            self.act_fn = original.act_fn
        # the original class's gating function (plain function, called with this module as `self`)
        self._gate_function = getattr(type(original), "_apply_gate", None)
        self.residual_kind = layout.residual_kind
        self.register_buffer("expert_group", torch.tensor(layout.expert_group, dtype=torch.int64))
        self._group_members = [layout.members(g) for g in range(layout.num_groups)]
        for matrix_type in info.matrix_types:
            out_features, in_features = info.shape(matrix_type)
            spec = layout.lowrank.get(matrix_type)
            module = (
                LowRankExpertMatrices(out_features, in_features, layout.expert_group, spec, layout.residual_kind)
                if spec is not None
                else DenseExpertMatrices(info.num_experts, out_features, in_features)
            )
            self.add_module(matrix_type, module)
        if info.has_bias:
            fused_in = 2 * info.intermediate_size if info.has_gate else info.intermediate_size
            self.bias_gate_up = nn.Parameter(torch.empty(info.num_experts, fused_in))
            self.bias_down = nn.Parameter(torch.empty(info.num_experts, info.hidden_size))

    def _apply_gate(self, fused: torch.Tensor) -> torch.Tensor:
        """The original module's gating of the fused gate/up activations (default: act(gate) * up)."""
        if self._gate_function is not None:
            return self._gate_function(self, fused)
        gate, up = self.layout_info.split_fused(fused)
        return self.act_fn(gate) * up

    @property
    def compressed_types(self) -> list[str]:
        """Matrix types held as low-rank factors."""
        return [t for t in self.layout_info.matrix_types if isinstance(getattr(self, t), LowRankExpertMatrices)]

    def refresh_groups(self) -> None:
        """Recompute the cached group membership from the `expert_group` buffer (after loading weights)."""
        groups = self.expert_group.tolist()
        self._group_members = [[e for e, g in enumerate(groups) if g == group] for group in range(max(groups) + 1)]

    def _in_projections(self, inputs: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
        """Shared basis products B_g x of the input-side compressed types for one group's tokens."""
        return {
            t: getattr(self, t).project(inputs, group)
            for t in self.layout_info.matrix_types
            if t != "down" and isinstance(getattr(self, t), LowRankExpertMatrices)
        }

    def expert_hidden(
        self, inputs: torch.Tensor, expert: int, group: int, shared: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Expert `expert`'s output before routing weights: (T, H) -> (T, H)."""
        shared = shared or {}
        info = self.layout_info
        if info.has_gate:
            gate = self.gate.expert_forward(inputs, expert, group, shared.get("gate"))
            up = self.up.expert_forward(inputs, expert, group, shared.get("up"))
            fused = info.join_fused(gate, up)
            if info.has_bias:
                fused = fused + self.bias_gate_up[expert]
            activated = self._apply_gate(fused)
        else:
            up = self.up.expert_forward(inputs, expert, group, shared.get("up"))
            if info.has_bias:
                up = up + self.bias_gate_up[expert]
            activated = self.act_fn(up)
        output = self.down.expert_forward(activated, expert, group)
        if info.has_bias:
            output = output + self.bias_down[expert]
        return output

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        top_k = top_k_index.shape[-1]
        with torch.no_grad():
            flat_experts = top_k_index.reshape(-1)
            order = torch.argsort(flat_experts, stable=True)
            counts = torch.bincount(flat_experts, minlength=self.num_experts + 1).tolist()
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        for group, members in enumerate(self._group_members):
            hit = [e for e in members if counts[e] > 0]
            if not hit:
                continue
            slots = {e: order[starts[e] : starts[e + 1]] for e in hit}
            # slots are sorted by token within an expert (stable sort), so one expert needs no union / lookup
            group_tokens = (
                slots[hit[0]] // top_k if len(hit) == 1 else torch.unique(torch.cat([slots[e] // top_k for e in hit]))
            )
            shared = self._in_projections(hidden_states[group_tokens], group)
            for expert in hit:
                token_idx, top_k_pos = slots[expert] // top_k, slots[expert] % top_k
                if len(hit) > 1:
                    rows = torch.searchsorted(group_tokens, token_idx)
                    expert_shared = {t: value[rows] for t, value in shared.items()}
                else:
                    expert_shared = shared
                output = self.expert_hidden(hidden_states[token_idx], expert, group, expert_shared)
                output = output * top_k_weights[token_idx, top_k_pos, None]
                final_hidden_states.index_add_(0, token_idx, output.to(final_hidden_states.dtype))
        return final_hidden_states

    def materialize(self) -> dict[str, torch.Tensor]:
        """Dense (E, out, in) weight stacks of every matrix type (float32 for compressed ones)."""
        groups = self.expert_group.tolist()
        result = {}
        for matrix_type in self.layout_info.matrix_types:
            module = getattr(self, matrix_type)
            result[matrix_type] = (
                module.materialize(groups) if isinstance(module, LowRankExpertMatrices) else module.materialize()
            )
        return result

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Rebuild the original transformers experts module with the (approximated) dense weights."""
        matrices = self.materialize()
        reference = next(iter(self.parameters()))
        dtype = dtype or reference.dtype
        biases = {}
        if self.layout_info.has_bias:
            biases = {"gate_up": self.bias_gate_up.detach(), "down": self.bias_down.detach()}
        with torch.device(reference.device):
            dense = self.original_class(self.config)
        dense.to(dtype)
        self.layout_info.write_dense(dense, {t: m.to(dtype) for t, m in matrices.items()}, biases)
        return dense

    def stored_parameters(self) -> dict[str, int]:
        """Parameters held per matrix type (biases excluded)."""
        return {t: getattr(self, t).stored_parameters() for t in self.layout_info.matrix_types}
