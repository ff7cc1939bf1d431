"""`RFIDCompressor`: calibration -> allocation -> factorisation -> residual -> (writer), the public entry point."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from tqdm.auto import tqdm

from ..config import RFIDMoEConfig
from ..hub import bind_push_to_hub
from ..modeling.adapters import ExpertsLayout, check_supported, decoder_layers, find_experts_modules
from ..modeling.experts import FactorizedExperts, FactorizedLayout, LowRankExpertMatrices, LowRankSpec
from ..modeling.residual import BlockProjection, derive_seed, hash_code_dim
from ..report import parameter_ratios
from . import allocation
from .calibration import (
    CalibrationSource,
    CalibrationStatistics,
    ExpertStatistics,
    capture_layer_inputs,
    describe_calibration,
    intermediate_activations,
    new_statistics,
    prepare_calibration,
    record_experts,
    run_layer,
)
from .factorize import (
    GroupFactorization,
    encode_residual,
    factorize_group,
    refit_coefficients,
    relative_error,
    select_residual_columns,
)

logger = logging.getLogger(__name__)

_TYPE_INDEX = {"gate": 0, "up": 1, "down": 2}


def residual_code_dim(kind: str, out_features: int, in_features: int, fraction: float) -> int:
    """Residual code length per expert that fits in `fraction` of an (out x in) matrix (0: no residual)."""
    if kind == "none" or fraction <= 0:
        return 0
    if kind == "hash":
        return hash_code_dim(out_features, in_features, fraction)
    blocks = BlockProjection.blocks_for_budget(out_features, in_features, int(fraction * out_features * in_features))
    return out_features * blocks


@dataclass
class _MatrixPlan:
    """Allocation inputs and results of one (layer, matrix type)."""

    module_name: str
    matrix_type: str
    groups: list[list[int]]
    weights: torch.Tensor  # (E, out, in), the original stack
    group_frequencies: list[float]
    code_dim: int
    budget: float  # parameters for bases + coefficients
    effective_ranks: list[float] = field(default_factory=list)
    factorizations: list[GroupFactorization | None] | None = None
    group_grams: list[torch.Tensor | None] = field(default_factory=list)  # the whitening Gram of each group
    weight_only_groups: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    @property
    def out_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.weights.shape[2])

    @property
    def unit_costs(self) -> list[int]:
        """Parameters of one rank unit per group: |g| * out + in."""
        return [len(g) * self.out_features + self.in_features for g in self.groups]

    @property
    def max_ranks(self) -> list[int]:
        return [min(len(g) * self.out_features, self.in_features) for g in self.groups]


def factorize_experts(
    original: nn.Module,
    groups: Sequence[Sequence[int]],
    ranks: dict[str, Sequence[int]],
    *,
    residual: str = "none",
    residual_dims: dict[str, int] | None = None,
    seed: int = 0,
    grams: dict[str, list[torch.Tensor | None]] | None = None,
    expert_grams: dict[str, dict[int, torch.Tensor]] | None = None,
    whitening_floor: float = 1e-6,
    factorizations: dict[str, list[GroupFactorization]] | None = None,
    refit: bool = False,
) -> tuple[FactorizedExperts, dict[str, list[float]]]:
    """Factorise a transformers fused experts module with explicit groups and ranks.

    `ranks[t][g]` is the rank of group g for matrix type t (types not in `ranks` stay dense). `grams[t][g]` whitens
    group g; `expert_grams[t][e]` fits expert e's residual codes (`residual="fit"`) and, with `refit`, its
    coefficients for the shared basis (least squares on its own inputs). Returns the new module and the
    relative weight error of every expert per compressed type. At full rank, without residual, the factorised
    module reproduces the original up to float round-off.
    """
    info = ExpertsLayout.of(original)
    expert_group = [0] * info.num_experts
    for group_index, members in enumerate(groups):
        for expert in members:
            expert_group[expert] = group_index
    if sorted(e for g in groups for e in g) != list(range(info.num_experts)):
        raise ValueError("groups must partition the experts 0..E-1")
    residual_dims = residual_dims or {}
    layout = FactorizedLayout(expert_group=expert_group, residual_kind=residual)
    for matrix_type, type_ranks in ranks.items():
        if matrix_type not in info.matrix_types:
            raise ValueError(f"{type(original).__name__} has no {matrix_type!r} matrices")
        layout.lowrank[matrix_type] = LowRankSpec(list(type_ranks), residual_dims.get(matrix_type, 0))
    reference = next(iter(original.parameters()))
    with torch.device(reference.device):
        module = FactorizedExperts(original, layout).to(reference.dtype)
    matrices = info.read_matrices(original)
    errors: dict[str, list[float]] = {}
    with torch.no_grad():
        for matrix_type in info.matrix_types:
            target = getattr(module, matrix_type)
            weights = matrices[matrix_type].detach()
            if not isinstance(target, LowRankExpertMatrices):
                target.dense.copy_(weights)
                continue
            type_errors = [0.0] * info.num_experts
            for group_index, members in enumerate(groups):
                group_weights = weights[list(members)].to(torch.float64)
                factorization = (factorizations or {}).get(matrix_type, [None] * len(groups))[group_index]
                if factorization is None:
                    gram = (grams or {}).get(matrix_type, [None] * len(groups))[group_index]
                    factorization = factorize_group(group_weights, gram, whitening_floor)
                basis, coefficients = factorization.truncate(ranks[matrix_type][group_index])
                if refit:
                    coefficients = coefficients.clone()
                    for position, expert in enumerate(members):
                        expert_gram = (expert_grams or {}).get(matrix_type, {}).get(expert)
                        if expert_gram is not None:
                            coefficients[position] = refit_coefficients(
                                group_weights[position], basis, expert_gram, initial=coefficients[position]
                            )
                target.bases[group_index].weight.copy_(basis)
                residuals = {}
                if target.residual is not None:
                    if residual == "hash":
                        target.residual.seeds[group_index] = derive_seed(seed, _TYPE_INDEX[matrix_type], group_index)
                    residuals = {
                        expert: group_weights[position] - coefficients[position] @ basis
                        for position, expert in enumerate(members)
                    }
                    if residual == "fit":
                        group_gram = (grams or {}).get(matrix_type, [None] * len(groups))[group_index]
                        target.residual.columns[group_index] = select_residual_columns(
                            list(residuals.values()), group_gram, target.residual.columns.shape[1]
                        )
                for position, expert in enumerate(members):
                    target.coefficients[expert].weight.copy_(coefficients[position])
                    approximation = coefficients[position] @ basis
                    if residuals:
                        projection = target.residual.projection(group_index)
                        expert_gram = (expert_grams or {}).get(matrix_type, {}).get(expert)
                        use_gram = expert_gram if residual == "fit" else None
                        code = encode_residual(projection, residuals[expert], use_gram)
                        target.residual.codes[expert] = code.to(target.residual.codes.dtype)
                        stored_code = target.residual.codes[expert : expert + 1].double()
                        approximation = approximation + projection.decode(stored_code)[0]
                    type_errors[expert] = relative_error(group_weights[position], approximation)
            errors[matrix_type] = type_errors
        if info.has_bias:
            biases = info.read_biases(original)
            module.bias_gate_up.copy_(biases["gate_up"])
            module.bias_down.copy_(biases["down"])
    module.train(original.training)
    return module, errors


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class RFIDCompressor(OptimumQuantizer):
    """Compress the routed experts of a transformers MoE model with RFID-MoE.

    ```python
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6))
    compressed = compressor.compress(model, calibration="train.txt", tokenizer=tokenizer, num_samples=128)
    compressed.save_pretrained("out")  # loadable with AutoModelForCausalLM after `import hf_rfid`
    ```

    Also implements optimum's `OptimumQuantizer` interface: `RFIDCompressor.from_pretrained(path).quantize(save_dir)`.
    After `compress`, `compressor.report` holds the per-layer allocation report (also written as `rfid_report.json`
    by `quantize` and `hf_rfid.compress.writer.save_compressed`).
    """

    def __init__(self, config: RFIDMoEConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = RFIDMoEConfig(**overrides)
        elif overrides:
            config = RFIDMoEConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.source: str | None = None
        self.report: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | Path | nn.Module,
        file_name: str | None = None,
        config: RFIDMoEConfig | None = None,
        **overrides: Any,
    ) -> RFIDCompressor:
        """A compressor bound to a model (a loaded model, or a local directory / Hub id loaded with its tokenizer).

        `file_name` exists for optimum's `OptimumQuantizer` signature; hf-rfid loads whole checkpoints only.
        """
        if file_name is not None:
            raise ValueError("file_name is not supported: pass the checkpoint directory or Hub id")
        compressor = cls(config, **overrides)
        if isinstance(model_or_path, nn.Module):
            compressor.model = model_or_path
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            compressor.model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype="auto")
            compressor.tokenizer = AutoTokenizer.from_pretrained(model_or_path)
            compressor.source = str(model_or_path)
        return compressor

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs: Any) -> Path:
        """Compress the bound model (keyword arguments as in `compress`) and save it to `save_dir`.

        `file_prefix` exists for optimum's `OptimumQuantizer` signature; the weights are always `model*.safetensors`.
        """
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: hf-rfid writes standard model*.safetensors files")
        if self.model is None:
            raise ValueError("no model bound: use RFIDCompressor.from_pretrained(model_or_path) first")
        kwargs.setdefault("tokenizer", self.tokenizer)
        overwrite = kwargs.pop("overwrite", False)
        compressed = self.compress(self.model, **kwargs)
        from .writer import save_compressed

        return save_compressed(
            compressed, save_dir, tokenizer=kwargs.get("tokenizer"), report=self.report, overwrite=overwrite
        )

    # ------------------------------------------------------------------ compression

    def compress(
        self,
        model: nn.Module,
        calibration: CalibrationSource | None = None,
        *,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        seed: int | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
        statistics: CalibrationStatistics | None = None,
    ) -> nn.Module:
        """Replace every routed experts module of `model` (in place) and return the model.

        `calibration` is a text file or folder, a JSONL file, a list of strings, token ids, or a dataset name
        (`wikitext2`, `c4`, `ptb`); `None` compresses data-free and weight-only (every expert equally frequent, the
        automatic whitening and refit off, with a warning; options that need data raise `ValueError`).
        `statistics` (from `collect_statistics`, with `propagate="original"`) replaces the calibration pass, so one
        pass can serve several compressions of the same model.
        """
        requested_config = self.config
        try:
            config = self.config
            check_supported(model)
            _check_counts(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
            seed = config.seed if seed is None else seed
            started = time.perf_counter()
            self._timings = {"calibration_s": 0.0, "svd_s": 0.0, "residual_s": 0.0}
            self._warnings: list[str] = []
            targets = self._targets(model)
            before = self._parameter_counts(model)
            tokenizer = tokenizer or self.tokenizer
            batch = None
            if calibration is None and statistics is None and config.requires_calibration:
                raise ValueError(
                    f"whitening={config.whitening!r} / residual={config.residual!r} / refit_coefficients="
                    f"{config.refit_coefficients} need calibration data; pass calibration= (a text file, folder, "
                    "list of strings or dataset name)"
                )
            # decide the automatic (None) switches for this run; the saved config records the values used
            config = self.config = config.resolved(calibrated=calibration is not None or statistics is not None)
            if statistics is not None:
                statistics.check(config, [name for name, _ in targets])
            elif calibration is None:
                self._warn(
                    "no calibration data: compressing data-free and weight-only (every expert counted as equally "
                    "frequent, no whitening, no coefficient refit); pass calibration= for frequency-aware ranks and "
                    "activation-aware factors, which matter a lot on pretrained weights"
                )
            else:
                batch = prepare_calibration(calibration, tokenizer, num_samples, seq_len, seed)
            was_training = model.training
            model.eval()
            try:
                if statistics is not None:
                    layer_reports = self._compress_with(model, targets, statistics.modules)
                elif batch is None:
                    layer_reports = self._compress_with(model, targets, {}, show_progress)
                else:
                    layer_reports = self._compress_calibrated(model, targets, batch, batch_size, show_progress)
            finally:
                model.train(was_training)
            self._attach(model, [name for name, _ in targets])
            self._timings["total_s"] = time.perf_counter() - started
            calibration_info = statistics.describe() if statistics is not None else None
            if batch is not None:
                calibration_info = describe_calibration(batch, calibration, seed)
            self.report = self._build_report(model, layer_reports, before, calibration_info)
            model.rfid_report = self.report
            if tokenizer is not None:
                model.rfid_tokenizer = tokenizer
            return model
        finally:
            self.config = requested_config  # keep the automatic switches for the next run

    def collect_statistics(
        self,
        model: nn.Module,
        calibration: CalibrationSource,
        *,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        seed: int | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> CalibrationStatistics:
        """One calibration pass over the original model: routing counts and, if this config needs them, input Grams.

        The result can be passed as `statistics=` to `compress` of compressors whose configs use
        `propagate="original"` (the statistics of later layers come from the uncompressed model).
        """
        _check_counts(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
        seed = self.config.seed if seed is None else seed
        batch = prepare_calibration(calibration, tokenizer or self.tokenizer, num_samples, seq_len, seed)
        self._timings = {"calibration_s": 0.0, "svd_s": 0.0, "residual_s": 0.0}
        was_training = model.training
        model.eval()
        try:
            modules = self._calibration_pass(model, self._targets(model), batch, batch_size, show_progress)
        finally:
            model.train(was_training)
        return CalibrationStatistics(
            modules=modules,
            info=describe_calibration(batch, calibration, seed),
            hidden_grams=self._collects_hidden(),
            intermediate_grams=self._collects_intermediate(),
        )

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        targets = [
            (name, module)
            for name, module in find_experts_modules(model)
            if not getattr(module, "is_factorized", False) and self.config.is_convertible(name)
        ]
        if not targets:
            raise ValueError("no experts module left to compress (all factorised already or excluded)")
        return targets

    def _warn(self, message: str) -> None:
        self._warnings.append(message)
        warnings.warn(message, stacklevel=3)

    def _attach(self, model: nn.Module, names: list[str]) -> None:
        """Make the in-memory model look loaded from an rfid_moe checkpoint (config, quantizer, flags)."""
        from transformers.quantizers.base import _assign_is_quantized

        from ..quantizer import RFIDMoEHfQuantizer, register

        register()
        existing = getattr(model.config, "quantization_config", None)
        previous = existing.compressed_modules if isinstance(existing, RFIDMoEConfig) else None
        self.config.compressed_modules = sorted(set(previous or []) | set(names))
        model.config.quantization_config = self.config
        model.hf_quantizer = RFIDMoEHfQuantizer(self.config, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = self.config.quant_method
        _assign_is_quantized(model)
        bind_push_to_hub(model)

    @staticmethod
    def _parameter_counts(model: nn.Module) -> dict[str, int]:
        """Parameters of the MoE blocks and of the whole model, before compression."""
        blocks = {name.rsplit(".", 1)[0] for name, _ in find_experts_modules(model)}
        return {
            "moe": sum(_parameter_count(model.get_submodule(block)) for block in blocks),
            "model": _parameter_count(model),
        }

    # -------------------------------------------------------------- per-layer planning

    def _plan_module(
        self, name: str, module: nn.Module, statistics: ExpertStatistics | None
    ) -> tuple[list[list[int]], list[float], list[_MatrixPlan]]:
        """Groups, frequencies and per-type spectra (factorised when the budget is per layer)."""
        config = self.config
        info = ExpertsLayout.of(module)
        counts = statistics.counts.tolist() if statistics is not None else [0] * info.num_experts
        frequencies = allocation.routing_frequencies(counts)
        groups = allocation.group_experts(frequencies, config.group_size)
        matrices = info.read_matrices(module)
        fraction = config.effective_residual_fraction
        plans = []
        for matrix_type in config.targets:
            if matrix_type not in info.matrix_types:
                continue
            out_features, in_features = info.shape(matrix_type)
            code_dim = residual_code_dim(config.residual, out_features, in_features, fraction)
            original = info.num_experts * out_features * in_features
            plan = _MatrixPlan(
                module_name=name,
                matrix_type=matrix_type,
                groups=groups,
                weights=matrices[matrix_type].detach(),
                group_frequencies=[sum(frequencies[e] for e in g) for g in groups],
                code_dim=code_dim,
                budget=config.keep * original - info.num_experts * code_dim,
            )
            space = "intermediate" if matrix_type == "down" else "hidden"
            factorizations = []
            for group_index, members in enumerate(groups):
                gram = None
                if config.whitening == "activation" and statistics is not None:
                    if statistics.expert_tokens(members) >= config.min_expert_tokens:
                        gram = statistics.gram(space, members)
                    if gram is None:
                        plan.weight_only_groups.append(group_index)
                tick = time.perf_counter()
                factorization = factorize_group(plan.weights[members].to(torch.float64), gram, config.whitening_floor)
                self._timings["svd_s"] += time.perf_counter() - tick
                plan.group_grams.append(gram)
                plan.effective_ranks.append(
                    allocation.effective_rank(factorization.singular_values, config.erank_power)
                )
                # a global budget plans every layer before building any: keep only the spectrum, refactorise later
                factorizations.append(None if config.budget_scope == "global" else factorization)
            if plan.weight_only_groups:
                self._warn(
                    f"{name}.{matrix_type}: groups {plan.weight_only_groups} had fewer than "
                    f"{config.min_expert_tokens} routed calibration tokens; whitened with weight-only statistics"
                )
            plan.factorizations = factorizations
            plans.append(plan)
        return groups, frequencies, plans

    def _scores(self, plans: list[_MatrixPlan]) -> list[float]:
        """Fused scores over the groups of all `plans` (one plan per layer, or all layers of a type)."""
        config = self.config
        sizes = [len(g) for plan in plans for g in plan.groups]
        if config.allocation == "uniform":
            return [1.0] * len(sizes)
        eranks = [e for plan in plans for e in plan.effective_ranks]
        freqs = [f for plan in plans for f in plan.group_frequencies]
        return allocation.fused_scores(eranks, freqs, config.effective_xi, config.score_normalization)

    def _allocate(self, plans: list[_MatrixPlan]) -> None:
        scores = self._scores(plans)
        costs = [u for plan in plans for u in plan.unit_costs]
        limits = [m for plan in plans for m in plan.max_ranks]
        budget = sum(plan.budget for plan in plans)
        try:
            ranks = allocation.allocate_ranks(scores, costs, limits, budget, self.config.exact_budget)
        except ValueError as error:
            raise ValueError(f"{plans[0].module_name}.{plans[0].matrix_type}: {error}") from error
        position = 0
        for plan in plans:
            count = len(plan.groups)
            plan.scores, plan.ranks = scores[position : position + count], ranks[position : position + count]
            position += count

    def _build(
        self,
        name: str,
        module: nn.Module,
        layer_index: int,
        plans: list[_MatrixPlan],
        statistics: ExpertStatistics | None,
    ) -> tuple[FactorizedExperts, dict[str, list[float]]]:
        config = self.config
        for plan in plans:
            if plan.factorizations is None or any(f is None for f in plan.factorizations):
                tick = time.perf_counter()
                plan.factorizations = [
                    factorize_group(plan.weights[members].to(torch.float64), gram, config.whitening_floor)
                    for members, gram in zip(plan.groups, plan.group_grams, strict=True)
                ]
                self._timings["svd_s"] += time.perf_counter() - tick
        expert_grams, group_grams = None, None
        if (config.residual == "fit" or config.refit_coefficients) and statistics is not None:
            expert_grams, group_grams = {}, {}
            for plan in plans:
                space = "intermediate" if plan.matrix_type == "down" else "hidden"
                grams = statistics.intermediate_grams if space == "intermediate" else statistics.hidden_grams
                expert_grams[plan.matrix_type] = {
                    e: g for e, g in grams.items() if int(statistics.gram_tokens[e]) >= config.min_expert_tokens
                }
                group_grams[plan.matrix_type] = [statistics.gram(space, members) for members in plan.groups]
        tick = time.perf_counter()
        replacement, errors = factorize_experts(
            module,
            plans[0].groups,
            {plan.matrix_type: plan.ranks for plan in plans},
            residual=config.residual if any(plan.code_dim for plan in plans) else "none",
            residual_dims={plan.matrix_type: plan.code_dim for plan in plans},
            seed=derive_seed(config.seed, layer_index),
            grams=group_grams,
            expert_grams=expert_grams,
            refit=config.refit_coefficients,
            factorizations={plan.matrix_type: plan.factorizations for plan in plans},
        )
        self._timings["residual_s"] += time.perf_counter() - tick
        return replacement, errors

    def _layer_report(
        self,
        name: str,
        layer_index: int,
        groups: list[list[int]],
        frequencies: list[float],
        plans: list[_MatrixPlan],
        errors: dict[str, list[float]],
        statistics: ExpertStatistics | None,
        replacement: FactorizedExperts,
    ) -> dict[str, Any]:
        stored = replacement.stored_parameters()
        report: dict[str, Any] = {
            "module": name,
            "layer": layer_index,
            "tokens": statistics.tokens if statistics is not None else 0,
            "routing_counts": statistics.counts.tolist() if statistics is not None else None,
            "routing_frequencies": frequencies,
            "groups": groups,
            "matrices": {},
        }
        for plan in plans:
            original = plan.weights.numel()
            report["matrices"][plan.matrix_type] = {
                "shape": [plan.out_features, plan.in_features],
                "effective_ranks": plan.effective_ranks,
                "group_frequencies": plan.group_frequencies,
                "scores": plan.scores,
                "ranks": plan.ranks,
                "max_ranks": plan.max_ranks,
                "residual_dim": plan.code_dim,
                "budget": plan.budget + plan.code_dim * plan.weights.shape[0],
                "original_parameters": original,
                "stored_parameters": stored[plan.matrix_type],
                "kept_fraction": stored[plan.matrix_type] / original,
                "relative_error": errors.get(plan.matrix_type),
                "weight_only_groups": plan.weight_only_groups,
            }
        return report

    def _layer_indices(self, model: nn.Module, names: list[str]) -> dict[str, int]:
        list_name, _ = decoder_layers(model)
        return {name: int(name[len(list_name) + 1 :].split(".")[0]) for name in names}

    def _compress_modules(
        self, model: nn.Module, entries: list[tuple[str, nn.Module, ExpertStatistics | None]], bar: Any = None
    ) -> list[dict[str, Any]]:
        """Plan, allocate and factorise a set of experts modules (one layer, or all layers when scope is global)."""
        indices = self._layer_indices(model, [name for name, _, _ in entries])
        planned = []
        for name, module, statistics in entries:
            if bar is not None:
                bar.set_description(f"decoder layer {indices[name]}: factorising")
            planned.append((name, module, statistics, *self._plan_module(name, module, statistics)))
        for matrix_type in self.config.targets:
            type_plans = [p for entry in planned for p in entry[5] if p.matrix_type == matrix_type]
            if not type_plans:
                continue
            if self.config.budget_scope == "global":
                self._allocate(type_plans)
            else:
                for plan in type_plans:
                    self._allocate([plan])
        reports = []
        for name, module, statistics, groups, frequencies, plans in planned:
            replacement, errors = self._build(name, module, indices[name], plans, statistics)
            model.set_submodule(name, replacement)
            reports.append(
                self._layer_report(name, indices[name], groups, frequencies, plans, errors, statistics, replacement)
            )
            for plan in plans:
                plan.factorizations, plan.group_grams = None, []  # free the SVD factors
        return reports

    def _compress_with(
        self,
        model: nn.Module,
        targets: list[tuple[str, nn.Module]],
        statistics: dict[str, ExpertStatistics],
        show_progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Compress every target from known statistics (none: data-free), per layer or pooled (global scope)."""
        entries = [(name, module, statistics.get(name)) for name, module in targets]
        if self.config.budget_scope == "global":
            return self._compress_modules(model, entries)
        reports = []
        with tqdm(total=len(entries), disable=not show_progress, desc="factorising") as bar:
            for entry in entries:
                reports.extend(self._compress_modules(model, [entry], bar))
                bar.update(1)
        return reports

    def _compress_calibrated(
        self,
        model: nn.Module,
        targets: list[tuple[str, nn.Module]],
        batch: Any,
        batch_size: int,
        show_progress: bool,
    ) -> list[dict[str, Any]]:
        config = self.config
        if config.budget_scope == "global":
            if config.propagate == "compressed":
                logger.info("budget_scope='global' collects every layer's statistics on the original model")
            statistics = self._calibration_pass(model, targets, batch, batch_size, show_progress)
            return self._compress_with(model, targets, statistics)
        reports: list[dict[str, Any]] = []

        def compress_layer(entries: list[tuple[str, nn.Module, ExpertStatistics]], bar: Any) -> None:
            reports.extend(self._compress_modules(model, entries, bar))

        self._calibration_pass(
            model, targets, batch, batch_size, show_progress, compress_layer, config.propagate == "compressed"
        )
        return reports

    def _collects_hidden(self) -> bool:
        return self.config.needs_activations and any(t != "down" for t in self.config.targets)

    def _collects_intermediate(self) -> bool:
        return self.config.needs_activations and "down" in self.config.targets

    def _calibration_pass(
        self,
        model: nn.Module,
        targets: list[tuple[str, nn.Module]],
        batch: Any,
        batch_size: int,
        show_progress: bool,
        compress_layer: Any = None,
        propagate_compressed: bool = False,
    ) -> dict[str, ExpertStatistics]:
        """Run the layers one by one over the calibration windows, collecting statistics at every experts module.

        With `compress_layer`, each layer is compressed as soon as its statistics are complete and its statistics
        are dropped (memory stays at one layer's Grams); with `propagate_compressed`, the compressed layer's outputs
        feed the next layer, otherwise the original outputs do. Without `compress_layer`, every layer's statistics
        are returned.
        """
        list_name, layers = decoder_layers(model)
        by_layer: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, module in targets:
            by_layer.setdefault(int(name[len(list_name) + 1 :].split(".")[0]), []).append((name, module))
        tick = time.perf_counter()
        inputs = capture_layer_inputs(model, layers, batch, batch_size)
        self._timings["calibration_s"] += time.perf_counter() - tick
        current = {"batch": 0}
        collected: dict[str, ExpertStatistics] = {}
        with tqdm(total=len(layers), disable=not show_progress, desc="calibrating") as bar:
            for layer_index, layer in enumerate(layers):
                entries = by_layer.get(layer_index, [])
                bar.set_description(f"layer {layer_index + 1}/{len(layers)}: calibrating")
                tick = time.perf_counter()
                with contextlib.ExitStack() as stack:
                    for name, module in entries:
                        collected[name] = new_statistics(
                            ExpertsLayout.of(module).num_experts, self.config.needs_activations
                        )
                        stack.enter_context(
                            record_experts(
                                module,
                                collected[name],
                                lambda: inputs.masks[current["batch"]],
                                self._collects_hidden(),
                                intermediate_activations(module) if self._collects_intermediate() else None,
                            )
                        )
                    outputs = run_layer(
                        layer,
                        inputs,
                        layer_index,
                        keep_outputs=not (propagate_compressed and entries),
                        on_batch=lambda index: current.update(batch=index),
                    )
                self._timings["calibration_s"] += time.perf_counter() - tick
                if compress_layer is not None and entries:
                    compress_layer([(name, module, collected.pop(name)) for name, module in entries], bar)
                    _return_freed_memory()
                    if propagate_compressed:
                        tick = time.perf_counter()
                        outputs = run_layer(layer, inputs, layer_index, keep_outputs=True, on_batch=lambda index: None)
                        self._timings["calibration_s"] += time.perf_counter() - tick
                inputs.hidden = outputs
                bar.update(1)
        return collected

    # ------------------------------------------------------------------ report

    def _build_report(
        self,
        model: nn.Module,
        layers: list[dict[str, Any]],
        before: dict[str, int],
        calibration: dict[str, Any] | None,
    ) -> dict[str, Any]:
        from .. import __version__

        original_compressed = sum(m["original_parameters"] for layer in layers for m in layer["matrices"].values())
        stored_compressed = sum(m["stored_parameters"] for layer in layers for m in layer["matrices"].values())
        return {
            "hf_rfid_version": __version__,
            "model_type": check_supported(model),
            "base_model": getattr(model.config, "_name_or_path", None) or self.source,
            "config": {k: v for k, v in self.config.to_dict().items() if k != "compressed_modules"},
            "calibration": calibration,
            "layers": layers,
            "totals": parameter_ratios(original_compressed, stored_compressed, before["moe"], before["model"]),
            "timings": dict(self._timings),
            "warnings": list(self._warnings),
        }


def _check_counts(**counts: int) -> None:
    """Raise `ValueError` naming the first argument that is not a positive integer."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS after each layer (glibc keeps it and the process grows otherwise)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
