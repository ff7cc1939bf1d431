"""The one place that writes a compressed checkpoint: atomically (temporary directory, then rename)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

REPORT_FILE = "rfid_report.json"
FIGURE_FILE = "rfid_allocation.png"


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place (same length).

    safetensors stores `__metadata__` from a hash map whose iteration order changes between processes, so two
    saves of identical tensors can differ in their header bytes. Sorting the keys makes checkpoints reproducible.
    """
    with path.open("r+b") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        raw = handle.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        del header["__metadata__"]
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}  # safetensors writes metadata first
        encoded = json.dumps(ordered, separators=(",", ":")).encode()
        if len(encoded) > length:
            return
        handle.seek(8)
        handle.write(encoded + b" " * (length - len(encoded)))


def save_compressed(
    model: nn.Module,
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    figure: bool = True,
    model_card: bool = True,
) -> Path:
    """Write model, tokenizer, `rfid_report.json`, the allocation figure and a model card to `output_dir`.

    Everything is written to a temporary sibling directory first and moved into place at the end, so an
    interrupted save never leaves a half-written checkpoint (and never destroys an existing one).
    """
    from ..hub import write_model_card
    from ..report import plot_allocation

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; pass overwrite=True (--overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = report if report is not None else getattr(model, "rfid_report", None)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); a checkpoint gets the usual permissions
    backup: Path | None = None
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        for weights in staging.glob("*.safetensors"):
            canonicalize_safetensors_header(weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            if figure:
                try:
                    plot_allocation(report, staging / FIGURE_FILE)
                except Exception as error:  # a figure is never worth losing a compression over
                    warnings.warn(f"skipped the allocation figure ({type(error).__name__}: {error})", stacklevel=2)
        if model_card:
            write_model_card(staging, report=report)
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            backup.rmdir()
            output.rename(backup)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None and backup.exists() and not output.exists():
            backup.rename(output)  # put the previous checkpoint back
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    logger.info("saved compressed model to %s", output)
    return output
