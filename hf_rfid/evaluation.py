"""Held-out perplexity, bits per byte, and router top-k agreement between a compressed and a reference model.

Perplexity protocol: the whole text is tokenised as one string (no special tokens) and cut into consecutive,
non-overlapping windows of `seq_len` tokens (a last partial window is kept if it has >= 2 tokens); every token but
the first of each window is predicted. Perplexity = exp(mean NLL); bits per byte = total NLL in bits / UTF-8 bytes of
the predicted tokens' text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .modeling.adapters import find_experts_modules

TEXT_SUFFIXES = {".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv"}


def read_text(source: str | Path) -> str:
    """The text of a file (or the string itself if it is not a path to a file).

    A `Path`, or a one-word string ending in a text-file suffix (`.txt`, `.jsonl`, ...), that names no file raises
    `FileNotFoundError` instead of being evaluated as text.
    """
    path = Path(source)
    if len(str(source)) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    looks_like_path = isinstance(source, str) and not any(c.isspace() for c in source) and path.suffix in TEXT_SUFFIXES
    if isinstance(source, Path) or looks_like_path:
        raise FileNotFoundError(f"no such file: {source}")
    return str(source)


def tokenize_windows(
    text: str, tokenizer: Any, seq_len: int, max_tokens: int | None = None
) -> tuple[list[torch.Tensor], list[int]]:
    """Consecutive windows of token ids and, per window, the UTF-8 bytes of its predicted tokens."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2; got {seq_len}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    ends = [end for _, end in encoding["offset_mapping"]]
    if max_tokens is not None:
        ids, ends = ids[:max_tokens], ends[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    byte_offset = [0]
    for character in text:
        byte_offset.append(byte_offset[-1] + len(character.encode("utf-8")))
    windows, predicted_bytes = [], []
    for start in range(0, len(ids), seq_len):
        stop = min(start + seq_len, len(ids))
        if stop - start < 2:
            break
        windows.append(torch.tensor(ids[start:stop], dtype=torch.long))
        predicted_bytes.append(byte_offset[ends[stop - 1]] - byte_offset[ends[start]])
    return windows, predicted_bytes


@contextmanager
def recording_routes(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, per experts module, the top-k expert indices of every token the model processes."""
    sink: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, experts in find_experts_modules(model):

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            sink.setdefault(name, []).append(index.detach().reshape(-1, index.shape[-1]).cpu())

        handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield sink
    finally:
        for handle in handles:
            handle.remove()


def _run_batches(model: nn.Module, windows: Sequence[torch.Tensor], batch_size: int, show_progress: bool):
    """Yield (logits, ids, mask) per batch of windows (right-padded; padded positions masked)."""
    device = next(model.parameters()).device
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, disable=not show_progress, desc="evaluating"):
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, window in enumerate(batch):
            ids[row, : len(window)] = window
            mask[row, : len(window)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        yield logits, ids.to(device), mask.to(device)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | Path,
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    show_progress: bool = False,
    routes: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Perplexity, mean NLL, bits per byte and token count of `model` on `text` (a string or a file path).

    Pass a dict as `routes` to also receive, per experts module, the top-k expert indices of every real token.
    """
    windows, window_bytes = tokenize_windows(read_text(text), tokenizer, seq_len, max_tokens)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        recorder = recording_routes(model) if routes is not None else nullcontext({})
        with recorder as recorded:
            masks = []
            for logits, ids, mask in _run_batches(model, windows, batch_size, show_progress):
                logits = logits[:, :-1].float()
                valid = mask[:, 1:].bool()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
                total_nll += float(nll.view_as(valid)[valid].sum())
                total_tokens += int(valid.sum())
                masks.append(mask.reshape(-1).bool().cpu())
        if routes is not None:
            keep = torch.cat(masks)
            routes.update({name: torch.cat(parts)[keep] for name, parts in recorded.items()})
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "bytes": sum(window_bytes),
        "bits_per_byte": total_nll / math.log(2) / max(1, sum(window_bytes)),
    }


def topk_agreement(routes: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fraction of tokens whose top-k expert set is equal in two recordings, per experts module and mean."""
    per_layer = {}
    for name, original in reference.items():
        if name in routes:
            a, b = routes[name].sort(dim=-1).values, original.sort(dim=-1).values
            if a.shape != b.shape:
                raise ValueError(f"{name}: the two recordings cover different tokens ({a.shape} vs {b.shape})")
            per_layer[name] = float((a == b).all(dim=-1).float().mean())
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else float("nan")
    return {"per_layer": per_layer, "mean": mean}


@torch.no_grad()
def routing_agreement(
    model: nn.Module, reference: nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 4
) -> dict[str, Any]:
    """Fraction of tokens whose top-k expert set is the same in `model` and `reference`, per MoE layer and mean."""
    recordings = []
    for current in (model, reference):
        with recording_routes(current) as recorded:
            masks = [mask.reshape(-1).bool().cpu() for _, _, mask in _run_batches(current, windows, batch_size, False)]
        keep = torch.cat(masks)
        recordings.append({name: torch.cat(parts)[keep] for name, parts in recorded.items()})
    return topk_agreement(*recordings)
