"""Calibration data and the layer-by-layer statistics pass.

Data: a text file or folder (documents separated by blank lines), JSONL with a `text` field, a list of strings,
pre-tokenised `input_ids` (with an optional `attention_mask`), or a Hub dataset name (`wikitext2`, `c4`, `ptb`,
through `datasets`, when the network allows). Text is tokenised, documents are joined with the EOS token, and N
non-overlapping windows of L tokens are drawn with a seeded choice.

Statistics: the inputs of every decoder layer are captured once (a forward whose layers are replaced by recorders),
then each layer is run on its own: a hook on its experts module sees exactly what the model's router chose
(`top_k_index`), so DeepSeek group-limited / sigmoid routing and GPT-OSS top-k-then-softmax are counted as the model
routes. Masked (padding) tokens are never counted. Input Grams (float64) are accumulated only when an option needs
them. The caller compresses the layer and then propagates its (compressed or original) outputs to the next layer.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling.adapters import ExpertsLayout
from ..modeling.residual import derive_seed, seeded_permutation

logger = logging.getLogger(__name__)

HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "train", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
}

CalibrationSource = str | Path | Sequence[str] | torch.Tensor | dict[str, torch.Tensor]


class CalibrationDataError(ValueError):
    """Calibration data is missing, unreadable or too short for the request."""


def _read_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        documents = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CalibrationDataError(f"{path}:{number} is not valid JSON ({error.msg})") from error
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CalibrationDataError(f"{path}:{number} has no string field 'text'")
                documents.append(record["text"])
        return documents
    text = path.read_text(encoding="utf-8")
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _hub_documents(name: str) -> list[str]:
    dataset_name, subset, split, column = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as error:
        raise CalibrationDataError(
            f"calibration={name!r} needs the `datasets` package: pip install datasets"
        ) from error
    try:
        data = datasets.load_dataset(dataset_name, subset, split=split, streaming=name == "c4")
        if name == "c4":
            return [row[column] for _, row in zip(range(20000), data)]
        return [text for text in data[column] if text.strip()]
    except Exception as error:  # network, hub or cache failures all mean "not available here"
        raise CalibrationDataError(
            f"could not load the {name!r} dataset through `datasets` ({type(error).__name__}: {error}). Without "
            "network access, pass a local text/JSONL file or folder instead."
        ) from error


def load_documents(source: str | Path | Sequence[str]) -> list[str]:
    """Documents from a file, a folder of .txt/.jsonl files, a list of strings, or a Hub dataset name."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(text, str) for text in source):
            raise CalibrationDataError("a calibration list must contain only strings")
        return [text for text in source if text.strip()]
    if isinstance(source, str) and source.lower() in HUB_DATASETS and not Path(source).exists():
        return _hub_documents(source.lower())
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise CalibrationDataError(f"calibration folder {path} holds no .txt or .jsonl file")
        return [document for file in files for document in _read_documents(file)]
    if path.is_file():
        return _read_documents(path)
    raise CalibrationDataError(
        f"calibration source {str(source)!r} is not a file, a folder, a list of strings or one of the datasets "
        f"{', '.join(HUB_DATASETS)}"
    )


@dataclass
class CalibrationBatch:
    """Token windows (N, L) and their mask (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Number of real (unmasked) tokens."""
        return int(self.attention_mask.sum())


def build_windows(
    documents: Sequence[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int = 0
) -> CalibrationBatch:
    """N non-overlapping windows of `seq_len` tokens from the EOS-joined token stream, chosen with `seed`."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"need num_samples >= 1 and seq_len >= 2; got {num_samples} and {seq_len}")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = array("q")  # compact: a Python list of ints costs ~36 bytes per token
    for start in range(0, len(documents), 1024):
        for ids in tokenizer(list(documents[start : start + 1024]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(separator)
    needed = num_samples * seq_len
    if len(stream) < needed:
        raise CalibrationDataError(
            f"calibration text has {len(stream)} tokens but {num_samples} samples x {seq_len} tokens need {needed}; "
            "give more text or lower --num-samples / --seq-len"
        )
    slots = len(stream) // seq_len
    chosen = sorted(seeded_permutation(slots, derive_seed(seed, 7))[:num_samples].tolist())
    tokens = torch.frombuffer(stream, dtype=torch.int64)[: slots * seq_len].view(slots, seq_len)[chosen].clone()
    return CalibrationBatch(tokens, torch.ones_like(tokens))


def prepare_calibration(
    source: CalibrationSource, tokenizer: Any, num_samples: int, seq_len: int, seed: int
) -> CalibrationBatch:
    """Turn any accepted calibration source into token windows."""
    if isinstance(source, torch.Tensor):
        ids = source if source.dim() == 2 else source[None]
        return CalibrationBatch(ids.long(), torch.ones_like(ids, dtype=torch.long))
    if isinstance(source, Mapping):  # a dict or a tokenizer's BatchEncoding
        ids = torch.as_tensor(source["input_ids"]).long()
        mask = torch.as_tensor(source.get("attention_mask", torch.ones_like(ids))).long()
        if ids.shape != mask.shape or ids.dim() != 2:
            raise CalibrationDataError("input_ids and attention_mask must both be (N, L)")
        return CalibrationBatch(ids, mask)
    if tokenizer is None:
        raise CalibrationDataError("text calibration needs a tokenizer: pass tokenizer= (or a model directory)")
    return build_windows(load_documents(source), tokenizer, num_samples, seq_len, seed)


class _StopForward(Exception):
    pass


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer during the capture pass: records its inputs, returns them unchanged."""

    def __init__(self, layer: nn.Module, sink: list, stop: bool) -> None:
        super().__init__()
        self.layer, self.sink, self.stop = layer, sink, stop

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((hidden_states, args, kwargs))
        if self.stop:
            raise _StopForward
        return hidden_states


@dataclass
class LayerInputs:
    """Per batch: the hidden states entering a layer and the extra arguments the model passed to it."""

    hidden: list[torch.Tensor]
    arguments: list[list[tuple[tuple, dict]]]  # [layer][batch] -> (args, kwargs)
    masks: list[torch.Tensor]  # [batch] flat token mask (B*S,)


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calibration: CalibrationBatch, batch_size: int
) -> LayerInputs:
    """Run the model once with every decoder layer replaced by a recorder; return layer-0 inputs and all kwargs."""
    originals = list(layers)
    sinks: list[list] = [[] for _ in originals]
    for index, layer in enumerate(originals):
        layers[index] = _LayerRecorder(layer, sinks[index], stop=index == len(originals) - 1)
    hidden, masks = [], []
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, calibration.input_ids.shape[0], batch_size):
                ids = calibration.input_ids[start : start + batch_size].to(device)
                mask = calibration.attention_mask[start : start + batch_size].to(device)
                with suppress(_StopForward):
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                masks.append(mask.reshape(-1).bool())
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    hidden = [entry[0] for entry in sinks[0]]
    arguments = [[(entry[1], entry[2]) for entry in sink] for sink in sinks]
    return LayerInputs(hidden=hidden, arguments=arguments, masks=masks)


@dataclass
class ExpertStatistics:
    """What one calibration pass over a layer saw at its experts module."""

    num_experts: int
    counts: torch.Tensor  # (E,) routed (token, slot) pairs per expert
    tokens: int = 0  # unmasked tokens seen
    hidden_grams: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> (H, H) float64
    intermediate_grams: dict[int, torch.Tensor] = field(default_factory=dict)  # expert -> (I, I) float64
    gram_tokens: torch.Tensor | None = None  # (E,) tokens accumulated into the Grams

    def gram(self, space: str, experts: Sequence[int]) -> torch.Tensor | None:
        """Pooled Gram of the given experts' routed inputs in `space` ("hidden" or "intermediate")."""
        grams = self.hidden_grams if space == "hidden" else self.intermediate_grams
        present = [grams[e] for e in experts if e in grams]
        return torch.stack(present).sum(0) if present else None

    def expert_tokens(self, experts: Sequence[int]) -> int:
        """Routed tokens of the given experts."""
        return int(sum(int(self.counts[e]) for e in experts))


def _accumulate(grams: dict[int, torch.Tensor], expert: int, rows: torch.Tensor) -> None:
    rows = rows.to(torch.float64)
    product = rows.T @ rows
    if expert in grams:
        grams[expert] += product
    else:
        grams[expert] = product


@contextmanager
def record_experts(
    experts: nn.Module,
    statistics: ExpertStatistics,
    mask_provider: Callable[[], torch.Tensor | None],
    collect_hidden: bool,
    intermediate_fn: Callable[[torch.Tensor, int], torch.Tensor] | None,
) -> Iterator[None]:
    """Hook the experts module: count routing decisions and (optionally) accumulate input Grams."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        top_k_index = top_k_index.reshape(hidden.shape[0], -1)
        mask = mask_provider()
        if mask is None or mask.numel() != hidden.shape[0]:
            mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        valid = top_k_index[mask]
        statistics.tokens += int(mask.sum())
        selected = valid[(valid >= 0) & (valid < statistics.num_experts)]
        statistics.counts += torch.bincount(selected.cpu(), minlength=statistics.num_experts)[: statistics.num_experts]
        if not collect_hidden and intermediate_fn is None:
            return
        kept = hidden[mask]
        for expert in selected.unique().tolist():
            token_rows = (valid == expert).any(dim=-1)
            rows = kept[token_rows]
            statistics.gram_tokens[expert] += rows.shape[0]
            if collect_hidden:
                _accumulate(statistics.hidden_grams, expert, rows)
            if intermediate_fn is not None:
                _accumulate(statistics.intermediate_grams, expert, intermediate_fn(rows, expert))

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def intermediate_activations(experts: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A function computing the input of `down` (the gated activation) of an original fused experts module."""
    layout = ExpertsLayout.of(experts)
    gate_function = getattr(type(experts), "_apply_gate", None)

    def compute(rows: torch.Tensor, expert: int) -> torch.Tensor:
        matrices = layout.read_matrices(experts)
        biases = layout.read_biases(experts)
        if layout.has_gate:
            gate = rows @ matrices["gate"][expert].T
            up = rows @ matrices["up"][expert].T
            fused = layout.join_fused(gate, up)
            if biases:
                fused = fused + biases["gate_up"][expert]
            if gate_function is not None:
                return gate_function(experts, fused)
            return experts.act_fn(gate) * up
        up = rows @ matrices["up"][expert].T
        if biases:
            up = up + biases["gate_up"][expert]
        return experts.act_fn(up)

    return compute


def new_statistics(num_experts: int, with_grams: bool) -> ExpertStatistics:
    """Empty statistics for a layer with `num_experts` experts."""
    return ExpertStatistics(
        num_experts=num_experts,
        counts=torch.zeros(num_experts, dtype=torch.int64),
        gram_tokens=torch.zeros(num_experts, dtype=torch.int64) if with_grams else None,
    )


def run_layer(
    layer: nn.Module, inputs: LayerInputs, layer_index: int, keep_outputs: bool, on_batch: Callable[[int], None]
) -> list[torch.Tensor] | None:
    """Run one decoder layer over every captured batch; return its outputs if `keep_outputs`."""
    outputs = [] if keep_outputs else None
    with torch.no_grad():
        for batch, hidden in enumerate(inputs.hidden):
            on_batch(batch)
            args, kwargs = inputs.arguments[layer_index][batch]
            result = layer(hidden, *args, **kwargs)
            result = result[0] if isinstance(result, tuple) else result
            if outputs is not None:
                outputs.append(result)
    return outputs


def describe_calibration(batch: CalibrationBatch, source: Any, seed: int) -> dict[str, Any]:
    """What the report records about the calibration data."""
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    return {
        "source": name,
        "num_samples": int(batch.input_ids.shape[0]),
        "seq_len": int(batch.input_ids.shape[1]),
        "tokens": batch.num_tokens,
        "seed": seed,
    }


@dataclass
class CalibrationStatistics:
    """Statistics of one calibration pass over the original model, reusable by several compressions."""

    modules: dict[str, ExpertStatistics]
    info: dict[str, Any]
    hidden_grams: bool
    intermediate_grams: bool

    def describe(self) -> dict[str, Any]:
        """The report's calibration entry."""
        return dict(self.info, reused_statistics=True)

    def check(self, config: Any, names: Sequence[str]) -> None:
        """Raise `ValueError` if these statistics cannot serve `config` for the experts modules `names`."""
        if config.propagate != "original":
            raise ValueError(
                "precomputed statistics come from the original model: use propagate='original' with statistics="
            )
        missing = [name for name in names if name not in self.modules]
        if missing:
            raise ValueError(f"the statistics do not cover {missing[0]}")
        needs_hidden = config.needs_activations and any(t != "down" for t in config.targets)
        needs_intermediate = config.needs_activations and "down" in config.targets
        if (needs_hidden and not self.hidden_grams) or (needs_intermediate and not self.intermediate_grams):
            raise ValueError(
                "these statistics hold no input Grams for the requested whitening/fit residual; collect them with a "
                "compressor whose config needs them"
            )
