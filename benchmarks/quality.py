"""Quality benchmark: every method at the same stored-parameter budget, on both benchmark MoEs, in one process.

    python benchmarks/quality.py                       # both models, keep 0.8 / 0.6 / 0.4, all methods
    python benchmarks/quality.py --models tiny --keeps 0.6 --methods rfid,svd-per-expert --eval-tokens 4096

For every (model, keep, method): perplexity and bits/byte on the held-out test splits, router top-k agreement with the
dense model (on the wiki split's tokens), the three parameter ratios and the compression time. All methods use the same
calibration windows. Round-to-nearest int8/int4 quantisation of the same expert matrices (per-output-channel,
implemented here: optimum-quanto only quantises nn.Linear layers and cannot reach transformers 5's fused 3-D expert
parameters) and RFID combined with int8 are compared at their byte sizes.

Writes `benchmarks/results/quality.json` and `quality.md` (plus one pair per model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    METHOD_NOTES,
    METHODS,
    RESULTS,
    TINY_MOE,
    calibration_text,
    eval_sets,
    quantise_experts,
    quantise_factors,
    set_threads,
    smollm_moe_dir,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_rfid
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.calibration import prepare_calibration
from hf_rfid.evaluation import perplexity, topk_agreement

# name -> (description, model directory, default keeps). Model (a) compresses almost for free down to 0.4, so its table
# goes lower; --keeps overrides both.
MODELS = {
    "tiny": ("trained-from-scratch OLMoE (assets/tiny-moe)", lambda: TINY_MOE, "0.8,0.6,0.4,0.2,0.1"),
    "smollm2-moe": ("SmolLM2-135M MoEfied into Mixtral (benchmarks/moefy.py)", smollm_moe_dir, "0.8,0.6,0.4"),
}


DTYPE = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_dtype = torch.bfloat16


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype).eval()


def _evaluate(model, tokenizer, texts: dict[str, Path], args, dense_routes=None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, path in texts.items():
        routes: dict[str, torch.Tensor] = {}
        measured = perplexity(
            model,
            tokenizer,
            path,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_tokens=args.eval_tokens,
            routes=routes,
        )
        result[name] = {
            "perplexity": measured["perplexity"],
            "bits_per_byte": measured["bits_per_byte"],
            "tokens": measured["tokens"],
        }
        if name == next(iter(texts)):
            result["_routes"] = routes
    if dense_routes is not None:
        result["router_topk_agreement"] = topk_agreement(result["_routes"], dense_routes)["mean"]
    return result


def _row(model_name: str, method: str, keep: float | None, evaluation: dict, extra: dict) -> dict[str, Any]:
    row = {"model": model_name, "method": method, "keep": keep}
    row.update({k: v for k, v in evaluation.items() if not k.startswith("_")})
    row.update(extra)
    return row


def run_model(model_name: str, args, model_dir: Path | None = None, on_row=lambda rows: None) -> list[dict[str, Any]]:
    """Every method at every keep on one model; ``on_row(rows)`` is called after each measured row."""
    description, locate, default_keeps = MODELS[model_name]
    keeps = args.keeps or [float(k) for k in default_keeps.split(",")]
    model_dir = Path(model_dir or locate())
    print(f"\n=== {model_name}: {description} ({model_dir})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = eval_sets(args.quick)
    calibration = prepare_calibration(calibration_text(), tokenizer, args.num_samples, args.calibration_len, args.seed)
    windows = {"input_ids": calibration.input_ids}
    rows = []

    dense = _load(model_dir)
    started = time.perf_counter()
    dense_eval = _evaluate(dense, tokenizer, texts, args)
    dense_routes = dense_eval.pop("_routes")
    rows.append(
        _row(
            model_name,
            "dense",
            None,
            dense_eval,
            {"kept_fraction": 1.0, "bytes_fraction": 1.0, "eval_seconds": time.perf_counter() - started},
        )
    )
    print(_format_row(rows[-1], texts), flush=True)
    on_row(rows)

    # one calibration pass per kind of statistics: routing counts only, and counts plus input Grams
    statistics, statistics_seconds = {}, {}
    if args.reuse_statistics:
        for grams in (False, True):
            kind = {} if grams else {"whitening": "none", "refit_coefficients": False}
            config = RFIDMoEConfig(propagate="original", **kind)
            tick = time.perf_counter()
            statistics[grams] = RFIDCompressor(config).collect_statistics(
                _load(model_dir), windows, batch_size=args.batch_size, show_progress=False
            )
            statistics_seconds[grams] = time.perf_counter() - tick

    for bits in args.quantise:
        model = _load(model_dir)
        tick = time.perf_counter()
        accounting = quantise_experts(model, bits)
        seconds = time.perf_counter() - tick
        evaluation = _evaluate(model, tokenizer, texts, args, dense_routes)
        original_bytes = accounting["parameters"] * 2  # bf16
        rows.append(
            _row(
                model_name,
                f"rtn-int{bits}",
                None,
                evaluation,
                {
                    "bytes_fraction": accounting["bytes"] / original_bytes,
                    "kept_fraction": 1.0,
                    "compress_seconds": seconds,
                },
            )
        )
        print(_format_row(rows[-1], texts), flush=True)
        on_row(rows)

    for keep in keeps:
        for method in args.methods:
            overrides = dict(METHODS[method])
            if args.reuse_statistics:
                overrides["propagate"] = "original"
            config = RFIDMoEConfig(keep=keep, seed=args.seed, **overrides)
            model = _load(model_dir)
            compressor = RFIDCompressor(config)
            tick = time.perf_counter()
            if args.reuse_statistics:
                compressor.compress(model, statistics=statistics[config.needs_activations], show_progress=False)
            else:
                compressor.compress(model, windows, batch_size=args.batch_size, show_progress=False)
            seconds = time.perf_counter() - tick
            if args.reuse_statistics:
                seconds += statistics_seconds[config.needs_activations]
            totals = compressor.report["totals"]
            evaluation = _evaluate(model, tokenizer, texts, args, dense_routes)
            extra = {
                "kept_fraction": totals["kept_fraction"],
                "bytes_fraction": totals["kept_fraction"],
                "moe_reduction": totals["moe_reduction"],
                "model_reduction": totals["model_reduction"],
                "compress_seconds": seconds,
                "svd_seconds": compressor.report["timings"]["svd_s"],
            }
            rows.append(_row(model_name, method, keep, evaluation, extra))
            print(_format_row(rows[-1], texts), flush=True)
            on_row(rows)
            if method == "rfid" and args.int8_keeps and keep in args.int8_keeps:  # the defaults, also int8
                accounting = quantise_factors(model, 8)
                evaluation = _evaluate(model, tokenizer, texts, args, dense_routes)
                rows.append(
                    _row(
                        model_name,
                        "rfid+int8",
                        keep,
                        evaluation,
                        {
                            **extra,
                            "bytes_fraction": accounting["bytes"] / (totals["original_compressed_parameters"] * 2),
                        },
                    )
                )
                print(_format_row(rows[-1], texts), flush=True)
                on_row(rows)
    return rows


def _format_row(row: dict[str, Any], texts: dict[str, Path]) -> str:
    ppl = " ".join(f"{row[name]['perplexity']:9.3f}" for name in texts)
    agreement = f"{row['router_topk_agreement']:.3f}" if "router_topk_agreement" in row else "  -  "
    keep = f"{row['keep']:.2f}" if row["keep"] is not None else "  - "
    return f"{row['method']:<20} keep {keep} bytes {row.get('bytes_fraction', 1):.3f} ppl {ppl} agree {agreement}"


def to_markdown(rows: list[dict[str, Any]], texts: list[str]) -> str:
    header = [
        "model",
        "method",
        "keep",
        "kept",
        "bytes",
        *[f"ppl {t}" for t in texts],
        f"bpb {texts[0]}",
        "router agree",
        "MoE red.",
        "model red.",
        "compress s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:

        def fmt(key: str, digits: int = 3, row: dict = row) -> str:
            value = row.get(key)
            return "-" if value is None else f"{value:.{digits}f}"

        cells = [
            row["model"],
            row["method"],
            "-" if row["keep"] is None else f"{row['keep']:.1f}",
            fmt("kept_fraction"),
            fmt("bytes_fraction"),
            *[f"{row[t]['perplexity']:.2f}" for t in texts],
            f"{row[texts[0]]['bits_per_byte']:.4f}",
            fmt("router_topk_agreement"),
            fmt("moe_reduction"),
            fmt("model_reduction"),
            fmt("compress_seconds", 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_summary(rows: list[dict[str, Any]], split: str) -> str:
    """One table per model: perplexity on ``split`` for every method (rows) at every keep (columns)."""
    out = []
    for model in dict.fromkeys(row["model"] for row in rows):
        model_rows = [row for row in rows if row["model"] == model]
        keeps = sorted({row["keep"] for row in model_rows if row["keep"] is not None}, reverse=True)
        methods = list(dict.fromkeys(row["method"] for row in model_rows if row["keep"] is not None))
        dense = next(row for row in model_rows if row["method"] == "dense")
        fixed = [row for row in model_rows if row["keep"] is None and row["method"] != "dense"]
        header = f"**{model}**: perplexity on `{split}` (dense {dense[split]['perplexity']:.2f}"
        header += "".join(
            f"; {row['method']} {row[split]['perplexity']:.2f} at {row['bytes_fraction']:.2f} of the bytes"
            for row in fixed
        )
        out += [header + ")", "", "| method | " + " | ".join(f"keep {k:.1f}" for k in keeps) + " |"]
        out.append("|---|" + "---|" * len(keeps))
        for method in methods:
            cells = []
            for keep in keeps:
                found = [row for row in model_rows if row["method"] == method and row["keep"] == keep]
                cells.append(f"{found[0][split]['perplexity']:.2f}" if found else "-")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-moe,tiny", help="comma-separated names (name=DIR overrides)")
    parser.add_argument(
        "--keeps", default=None, help="comma-separated kept fractions (default: 0.8,0.6,0.4; model tiny also 0.2,0.1)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quantise", default="8,4", help="RTN bit widths for the quantisation baselines")
    parser.add_argument("--int8-keeps", default="0.8,0.6", help="keeps at which RFID+int8 is also measured")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    parser.add_argument("--eval-tokens", type=int, default=None, help="evaluate the first N tokens of each split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="wiki split only")
    parser.add_argument(
        "--reuse-statistics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one calibration pass on the original model for all methods (propagate='original')",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE), help="compute dtype of every model")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the Markdown tables from the output's quality.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads((Path(args.output) / "quality.json").read_text())
        texts = saved["meta"]["eval_sets"]
        (Path(args.output) / "quality.md").write_text(to_markdown(saved["rows"], texts) + "\n")
        (Path(args.output) / "quality_summary.md").write_text(to_summary(saved["rows"], texts[0]))
        return 0
    global _dtype
    _dtype = DTYPE[args.dtype]
    args.keeps = [float(k) for k in args.keeps.split(",") if k] if args.keeps else None
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.quantise = [int(b) for b in args.quantise.split(",") if b]
    args.int8_keeps = [float(k) for k in args.int8_keeps.split(",") if k]
    threads = set_threads()
    hf_rfid.register()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    texts = list(eval_sets(args.quick))
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": threads,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "hf_rfid": hf_rfid.__version__,
        "methods": {m: METHOD_NOTES[m] for m in args.methods},
        "eval_sets": texts,
        "args": {k: v for k, v in vars(args).items()},
    }

    def write(model_rows: list[dict[str, Any]], complete: bool = False) -> None:
        """Rewrite the results after every row, so an interrupted run keeps what it measured."""
        everything = rows + model_rows
        meta.update(complete=complete, seconds=time.perf_counter() - started)
        (output / "quality.json").write_text(json.dumps({"meta": meta, "rows": everything}, indent=1) + "\n")
        (output / "quality.md").write_text(to_markdown(everything, texts) + "\n")
        (output / "quality_summary.md").write_text(to_summary(everything, texts[0]))

    for entry in [m for m in args.models.split(",") if m]:
        model_name, _, path = entry.partition("=")  # "tiny=/other/dir" evaluates another checkpoint
        if model_name not in MODELS:
            parser.error(f"unknown model {model_name!r}; choose from {', '.join(MODELS)} (or NAME=DIR)")
        model_rows = run_model(model_name, args, Path(path) if path else None, on_row=write)
        rows.extend(model_rows)
        (output / f"quality_{model_name}.md").write_text(to_markdown(model_rows, texts) + "\n")
    write([], complete=True)
    print(f"\nwrote {output / 'quality.md'} and quality.json in {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
