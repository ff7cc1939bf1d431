"""Summaries of compressed checkpoints: ranks per layer and group, the three parameter ratios, the figure."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FACTOR = re.compile(r"^(?P<type>gate|up|down)\.(?P<kind>bases|coefficients)\.(?P<index>\d+)\.weight$")


def checkpoint_files(path: str | Path) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [str(path / name) for name in sorted(set(weight_map.values()))]
    files = sorted(str(file) for file in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {path}")
    return files


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Ranks per layer/type/group and the three parameter ratios of a compressed checkpoint directory.

    Needs only `config.json` and the safetensors headers: the original sizes come from a meta-device skeleton of the
    dense architecture, the stored sizes from the factor tensors' shapes.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import _checkpoint_tensors
    from .modeling.adapters import ExpertsLayout, find_experts_modules

    path = Path(path)
    quantization = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") != "rfid_moe":
        raise ValueError(f"{path} is not an hf-rfid checkpoint (no quant_method 'rfid_moe' in config.json)")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # meta initialisation leaves tied embeddings untied; count them once
    tensors = _checkpoint_tensors(skeleton, checkpoint_files(path))
    layers, original, stored, moe_before = [], 0, 0, 0
    for name, module in find_experts_modules(skeleton):
        moe_before += sum(p.numel() for p in skeleton.get_submodule(name.rsplit(".", 1)[0]).parameters())
        info = ExpertsLayout.of(module)
        entries = {key[len(name) + 1 :]: shape for key, (_, _, shape) in tensors.items() if key.startswith(name + ".")}
        matrices = {}
        for matrix_type in info.matrix_types:
            ranks = {}
            type_stored = 0
            for suffix, shape in entries.items():
                match = _FACTOR.match(suffix)
                if match and match["type"] == matrix_type:
                    type_stored += shape[0] * shape[1]
                    if match["kind"] == "bases":
                        ranks[int(match["index"])] = shape[0]
            if not ranks:
                continue
            codes = entries.get(f"{matrix_type}.residual.codes", [0, 0])
            type_original = info.num_experts * info.shape(matrix_type)[0] * info.shape(matrix_type)[1]
            type_stored += codes[0] * codes[1]
            matrices[matrix_type] = {
                "ranks": [ranks[g] for g in sorted(ranks)],
                "residual_dim": codes[1],
                "original_parameters": type_original,
                "stored_parameters": type_stored,
            }
            original += type_original
            stored += type_stored
        if matrices:
            layers.append({"module": name, "matrices": matrices})
    model_before = sum(p.numel() for p in skeleton.parameters())
    return {
        "model_type": config.model_type,
        "quantization_config": quantization,
        "layers": layers,
        "totals": parameter_ratios(original, stored, moe_before, model_before),
    }


def parameter_ratios(original: int, stored: int, moe_before: int, model_before: int) -> dict[str, Any]:
    """The three ratios every run reports: kept fraction, MoE-parameter and whole-model parameter reduction."""
    moe_after = moe_before - original + stored
    model_after = model_before - original + stored
    return {
        "original_compressed_parameters": original,
        "stored_compressed_parameters": stored,
        "kept_fraction": stored / original if original else 1.0,
        "moe_parameters_before": moe_before,
        "moe_parameters_after": moe_after,
        "moe_reduction": 1 - moe_after / moe_before if moe_before else 0.0,
        "model_parameters_before": model_before,
        "model_parameters_after": model_after,
        "model_reduction": 1 - model_after / model_before if model_before else 0.0,
    }


def format_summary(summary: dict[str, Any], report: dict[str, Any] | None = None) -> str:
    """A plain-text table: per layer and matrix type the rank of every group, then the three ratios."""
    lines = []
    qc = summary["quantization_config"]
    lines.append(
        f"hf-rfid checkpoint: {summary['model_type']}, keep={qc.get('keep')}, allocation={qc.get('allocation')}, "
        f"group_size={qc.get('group_size')}, xi={qc.get('xi')}, residual={qc.get('residual')}, "
        f"whitening={qc.get('whitening')}, targets={','.join(qc.get('targets', []))}"
    )
    by_module = {layer["module"]: layer for layer in (report or {}).get("layers", [])}
    header = f"{'module':<40} {'type':<5} {'ranks per group':<40} {'resid':>6} {'erank':<28} {'rel.err':>7}"
    lines += [header, "-" * len(header)]
    for layer in summary["layers"]:
        detail = by_module.get(layer["module"], {})
        for matrix_type, matrix in layer["matrices"].items():
            extra = detail.get("matrices", {}).get(matrix_type, {})
            eranks = " ".join(f"{e:.1f}" for e in extra.get("effective_ranks", []))
            errors = extra.get("relative_error") or []
            error = f"{sum(errors) / len(errors):.3f}" if errors else ""
            ranks = " ".join(str(r) for r in matrix["ranks"])
            lines.append(
                f"{layer['module']:<40} {matrix_type:<5} {ranks:<40} {matrix['residual_dim']:>6} "
                f"{eranks:<28} {error:>7}"
            )
    totals = summary["totals"]
    lines += [
        "",
        f"kept fraction of compressed matrices : {totals['kept_fraction']:.4f} "
        f"({totals['stored_compressed_parameters']:,} / {totals['original_compressed_parameters']:,} parameters)",
        f"MoE-parameter reduction              : {totals['moe_reduction']:.4f} "
        f"({totals['moe_parameters_before']:,} -> {totals['moe_parameters_after']:,})",
        f"whole-model parameter reduction      : {totals['model_reduction']:.4f} "
        f"({totals['model_parameters_before']:,} -> {totals['model_parameters_after']:,})",
    ]
    if report and report.get("calibration"):
        calibration = report["calibration"]
        lines.append(
            f"calibration: {calibration['num_samples']} x {calibration['seq_len']} tokens from "
            f"{calibration['source']} (seed {calibration['seed']})"
        )
    elif report is not None:
        lines.append("calibration: none (data-free: equal routing frequencies)")
    return "\n".join(lines)


def plot_allocation(report: dict[str, Any], path: str | Path) -> Path | None:
    """PNG heatmaps of rank per layer x group beside the routing frequencies; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: skipping the allocation figure (pip install hf-rfid[plot])")
        return None
    layers = report.get("layers") or []
    if not layers:
        return None
    types = list(layers[0]["matrices"])
    figure, axes = plt.subplots(1, len(types) + 1, figsize=(4 * (len(types) + 1), 0.35 * len(layers) + 2.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    frequencies = [sorted(layer["routing_frequencies"], reverse=True) for layer in layers]
    image = axes[0].imshow(frequencies, aspect="auto", cmap="viridis")
    axes[0].set_title("routing frequency\n(experts sorted per layer)")
    axes[0].set_xlabel("expert rank by frequency")
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    figure.colorbar(image, ax=axes[0], fraction=0.046)
    for axis, matrix_type in zip(axes[1:], types, strict=True):
        ranks = [layer["matrices"][matrix_type]["ranks"] for layer in layers]
        width = max(len(r) for r in ranks)
        grid = [r + [float("nan")] * (width - len(r)) for r in ranks]
        image = axis.imshow(grid, aspect="auto", cmap="magma")
        axis.set_title(f"{matrix_type}: rank per group\n(group 0 = most routed)")
        axis.set_xlabel("group")
        axis.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
        figure.colorbar(image, ax=axis, fraction=0.046)
    try:
        config = report.get("config", {})
        figure.suptitle(
            f"hf-rfid allocation: keep={config.get('keep')}, allocation={config.get('allocation')}, "
            f"kept fraction {report['totals']['kept_fraction']:.3f}"
        )
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path
