"""Held-out perplexity, bits per byte, and router top-k agreement between a compressed and a reference model.

Perplexity protocol: the whole text is tokenised as one string (no special tokens) and cut into consecutive,
non-overlapping windows of `seq_len` tokens (a last partial window is kept if it has >= 2 tokens); every token but
the first of each window is predicted. Perplexity = exp(mean NLL); bits per byte = total NLL in bits / UTF-8 bytes of
the predicted tokens' text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .modeling.adapters import find_experts_modules


def read_text(source: str | Path) -> str:
    """The text of a file (or the string itself if it is not a path to a file)."""
    path = Path(source)
    if len(str(source)) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    if isinstance(source, Path):
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
) -> dict[str, float]:
    """Perplexity, mean NLL, bits per byte and token count of `model` on `text` (a string or a file path)."""
    windows, window_bytes = tokenize_windows(read_text(text), tokenizer, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in tqdm(batches, disable=not show_progress, desc="evaluating"):
            lengths = [len(w) for w in batch]
            ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, window in enumerate(batch):
                ids[row, : len(window)] = window
                mask[row, : len(window)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits = logits[:, :-1].float()
            targets = ids[:, 1:].to(device)
            valid = mask[:, 1:].to(device).bool()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            total_nll += float(nll.view_as(targets)[valid].sum())
            total_tokens += int(valid.sum())
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


def _record_routing(model: nn.Module, sink: dict[str, list[torch.Tensor]], stack: ExitStack) -> list[str]:
    names = []
    for name, experts in find_experts_modules(model):
        names.append(name)

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            sink.setdefault(name, []).append(index.detach().reshape(-1, index.shape[-1]).cpu())

        stack.callback(experts.register_forward_pre_hook(hook, with_kwargs=True).remove)
    return names


@torch.no_grad()
def routing_agreement(
    model: nn.Module, reference: nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 4
) -> dict[str, Any]:
    """Fraction of tokens whose top-k expert set is the same in `model` and `reference`, per MoE layer and mean."""
    routes: list[dict[str, list[torch.Tensor]]] = []
    for current in (model, reference):
        sink: dict[str, list[torch.Tensor]] = {}
        device = next(current.parameters()).device
        with ExitStack() as stack:
            names = _record_routing(current, sink, stack)
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                width = max(len(w) for w in batch)
                if any(len(w) != width for w in batch):  # keep shapes equal: run ragged windows one by one
                    for window in batch:
                        current(input_ids=window[None].to(device), use_cache=False)
                    continue
                current(input_ids=torch.stack(batch).to(device), use_cache=False)
        routes.append({name: torch.cat(sink[name]) for name in names if name in sink})
    compressed, original = routes
    per_layer = {}
    for name in original:
        if name not in compressed:
            continue
        a, b = compressed[name].sort(dim=-1).values, original[name].sort(dim=-1).values
        per_layer[name] = float((a == b).all(dim=-1).float().mean())
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else float("nan")
    return {"per_layer": per_layer, "mean": mean}
