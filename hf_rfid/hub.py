"""Model cards generated from the compression report, and publishing a compressed checkpoint to the Hub."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CARD_TAGS = ["rfid-moe", "moe", "low-rank", "hf-rfid"]


def _ratios_table(totals: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| quantity | value |",
            "|---|---|",
            f"| kept fraction of the compressed expert matrices | {totals['kept_fraction']:.4f} |",
            f"| MoE-parameter reduction | {totals['moe_reduction']:.4f} "
            f"({totals['moe_parameters_before']:,} -> {totals['moe_parameters_after']:,}) |",
            f"| whole-model parameter reduction | {totals['model_reduction']:.4f} "
            f"({totals['model_parameters_before']:,} -> {totals['model_parameters_after']:,}) |",
        ]
    )


def build_model_card(
    report: dict[str, Any] | None,
    *,
    base_model: str | None = None,
    perplexities: dict[str, dict[str, float]] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """Markdown model card (with YAML metadata) for a compressed checkpoint.

    `perplexities` maps a dataset name to `{"dense": ..., "compressed": ...}`; by default the measurements that
    `hf-rfid evaluate --record` stored in the report are used.
    """
    from huggingface_hub import ModelCard, ModelCardData

    report = report or {}
    perplexities = perplexities or report.get("evaluation")
    config = report.get("config", {})
    base_model = base_model or report.get("base_model")
    hub_base = base_model if base_model and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) else None
    data = ModelCardData(
        base_model=hub_base,
        base_model_relation="quantized" if hub_base else None,
        library_name="transformers",
        license=license,
        tags=list(dict.fromkeys([*CARD_TAGS, *(tags or [])])),
        pipeline_tag="text-generation",
    )
    lines = [
        "",
        "# RFID-MoE compressed model",
        "",
        f"The routed experts of {f'`{base_model}`' if base_model else 'this model'} were compressed with "
        "[hf-rfid](https://pypi.org/project/hf-rfid/) (RFID-MoE: ranks allocated by routing frequency and "
        "information density, group-shared SVD bases, residual codes through a sparse projection).",
        "",
        "**To load it, install and import hf-rfid first** (without the import, transformers builds the dense "
        "architecture with random experts):",
        "",
        "```bash",
        "pip install hf-rfid",
        "```",
        "```python",
        "import hf_rfid  # registers the rfid_moe quantization method",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(REPO_OR_DIR)",
        "```",
        "",
    ]
    if "totals" in report:
        lines += ["## Size", "", _ratios_table(report["totals"]), ""]
    if config:
        switches = ", ".join(
            f"`{key}={config[key]}`"
            for key in (
                "keep",
                "allocation",
                "group_size",
                "xi",
                "targets",
                "whitening",
                "residual",
                "residual_fraction",
                "budget_scope",
            )
            if key in config
        )
        lines += ["## Method", "", switches, ""]
    calibration = report.get("calibration")
    if calibration:
        lines += [
            f"Calibration: {calibration['num_samples']} windows of {calibration['seq_len']} tokens from "
            f"`{calibration['source']}` (seed {calibration['seed']}).",
            "",
        ]
    elif report:
        lines += ["Calibration: none (data-free; every expert counted as equally frequent).", ""]
    if perplexities:
        lines += ["## Measured perplexity", "", "| data | dense | compressed |", "|---|---|---|"]
        for name, values in perplexities.items():
            dense = f"{values['dense']:.3f}" if values.get("dense") is not None else "-"
            lines.append(f"| {name} | {dense} | {values['compressed']:.3f} |")
        lines.append("")
    layers = report.get("layers") or []
    if layers:
        lines += [
            "## Ranks per layer",
            "",
            "| layer | type | ranks per group (group 0 = most routed) |",
            "|---|---|---|",
        ]
        for layer in layers:
            for matrix_type, matrix in layer["matrices"].items():
                lines.append(f"| {layer['layer']} | {matrix_type} | {' '.join(str(r) for r in matrix['ranks'])} |")
        lines += ["", "The full allocation report is in `rfid_report.json`; `hf-rfid inspect DIR` prints it.", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(lines)).content


def write_model_card(directory: str | Path, report: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write `README.md` (the model card) into a checkpoint directory."""
    directory = Path(directory)
    if report is None and (directory / "rfid_report.json").exists():
        report = json.loads((directory / "rfid_report.json").read_text())
    path = directory / "README.md"
    path.write_text(build_model_card(report, **kwargs), encoding="utf-8")
    return path


class HubUploadError(RuntimeError):
    """Publishing to the Hub failed; the local checkpoint is untouched."""


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload RFID-MoE compressed model",
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Publish a saved compressed checkpoint directory (weights, config, tokenizer, report, figure, card) in one commit.

    Returns the URL of the commit (or of the pull request with `create_pr=True`). Any failure (HTTP, network, file)
    raises `HubUploadError`. The token is passed to `huggingface_hub` only; it is never printed or logged.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a saved checkpoint directory (no config.json)")
    if not (directory / "README.md").exists():
        write_model_card(directory)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as error:  # HTTP errors, network errors (httpx), timeouts, local file errors
        raise HubUploadError(f"uploading {directory} to {repo_id} failed ({type(error).__name__}: {error})") from error
    logger.info("published %s to %s", directory, repo_id)
    return str(getattr(info, "commit_url", info))


def push_compressed_model(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: str | int = "5GB",
    tags: list[str] | None = None,
    safe_serialization: bool = True,
    **unsupported: Any,
) -> str:
    """Save an in-memory compressed model with its report, figure, card and tokenizer, and publish it in one commit.

    Bound as `push_to_hub` on every compressed model (after `RFIDCompressor.compress` or loading), so
    `compressed.push_to_hub(repo)` publishes the whole checkpoint and not only the weights. Takes the arguments of
    transformers' `push_to_hub` that apply; others raise `TypeError` rather than being silently ignored.
    """
    import tempfile

    if unsupported:
        raise TypeError(f"push_to_hub() of an hf-rfid model does not support {sorted(unsupported)}")
    if not safe_serialization:
        raise ValueError("hf-rfid checkpoints are safetensors only (safe_serialization=False is not supported)")

    from .compress.writer import save_compressed

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "rfid_tokenizer", None)
    with tempfile.TemporaryDirectory(prefix="hf-rfid-push-") as staging:
        directory = save_compressed(
            model, Path(staging) / "checkpoint", tokenizer=tokenizer, max_shard_size=max_shard_size, model_card=False
        )
        write_model_card(directory, tags=tags)
        return push_to_hub(
            directory,
            repo_id,
            private=bool(private),
            token=token,
            commit_message=commit_message or "Upload RFID-MoE compressed model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def bind_push_to_hub(model: Any) -> None:
    """Make `model.push_to_hub(...)` publish through `push_compressed_model`."""
    import types

    model.push_to_hub = types.MethodType(push_compressed_model, model)
