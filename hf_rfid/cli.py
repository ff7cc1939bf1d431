"""`hf-rfid compress | evaluate | inspect | dequantize`: the command-line interface."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class CommandError(Exception):
    """A user error worth a one-line message and exit code 2."""


def _model_path(value: str) -> str:
    path = Path(value)
    if path.exists() and not (path / "config.json").exists():
        raise CommandError(f"{value} has no config.json: not a model directory")
    return value


def _load(path: str, dtype: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from .loading import from_pretrained

    model = from_pretrained(_model_path(path), dtype=DTYPES[dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _add_compress(subparsers: Any) -> None:
    from .config import ALLOCATIONS, BUDGET_SCOPES, PROPAGATIONS, RESIDUALS, WHITENINGS, RFIDMoEConfig

    parser = subparsers.add_parser("compress", help="compress the routed experts of an MoE model")
    parser.add_argument("model", help="model directory or Hub id (dense MoE checkpoint)")
    parser.add_argument("--output", "-o", required=True, help="directory for the compressed checkpoint")
    config = argparse.SUPPRESS  # not given: the RFIDMoEConfig default (or the --paper preset's value)
    defaults = RFIDMoEConfig()
    parser.add_argument(
        "--keep",
        type=float,
        default=config,
        help=f"kept fraction of the compressed matrices (0, 1] (default {defaults.keep})",
    )
    parser.add_argument("--calibration", help="text/JSONL file or folder, or wikitext2 | c4 | ptb (default: data-free)")
    parser.add_argument("--num-samples", type=_positive_int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=config, help=f"(default {defaults.seed})")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward pass")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="start from RFIDMoEConfig.paper(), the literal RFID-MoE method (weight-only SVD, xi 0.8, hash residual)",
    )
    parser.add_argument("--allocation", default=config, choices=ALLOCATIONS, help=f"(default {defaults.allocation})")
    parser.add_argument("--group-size", type=int, default=config, help=f"(default {defaults.group_size})")
    parser.add_argument("--xi", type=float, default=config, help=f"(default {defaults.xi})")
    parser.add_argument(
        "--budget-scope", default=config, choices=BUDGET_SCOPES, help=f"(default {defaults.budget_scope})"
    )
    parser.add_argument(
        "--targets",
        default=config,
        help=f"comma-separated subset of gate,up,down (default {','.join(defaults.targets)})",
    )
    parser.add_argument(
        "--whitening", default=config, choices=WHITENINGS, help="(default: activation with --calibration, else none)"
    )
    parser.add_argument(
        "--refit-coefficients",
        action=argparse.BooleanOptionalAction,
        default=config,
        help="refit every expert's coefficients on its own inputs (default: on with --calibration)",
    )
    parser.add_argument("--residual", default=config, choices=RESIDUALS, help=f"(default {defaults.residual})")
    parser.add_argument(
        "--residual-fraction", type=float, default=config, help=f"(default {defaults.residual_fraction})"
    )
    parser.add_argument(
        "--exact-budget",
        action=argparse.BooleanOptionalAction,
        default=config,
        help=f"(default {defaults.exact_budget})",
    )
    parser.add_argument("--propagate", default=config, choices=PROPAGATIONS, help=f"(default {defaults.propagate})")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also publish the result to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_compress)


def _compress(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compress.compressor import RFIDCompressor
    from .compress.writer import save_compressed
    from .config import RFIDMoEConfig

    fields = ("keep", "allocation", "group_size", "xi", "budget_scope", "targets", "whitening", "refit_coefficients")
    fields += ("residual", "residual_fraction", "exact_budget", "propagate", "seed")
    given = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    if "targets" in given:
        given["targets"] = [t.strip() for t in given["targets"].split(",") if t.strip()]
    config = RFIDMoEConfig.paper(**given) if args.paper else RFIDMoEConfig(**given)
    seed = config.seed
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise CommandError(f"{output} exists and is not empty; use --overwrite to replace it")
    if (
        args.calibration
        and not Path(args.calibration).exists()
        and args.calibration.lower() not in ("wikitext2", "c4", "ptb")
    ):
        raise CommandError(f"calibration source {args.calibration} does not exist")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(_model_path(args.model), dtype=DTYPES[args.dtype])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    compressor = RFIDCompressor(config)
    compressor.source = args.model
    model = compressor.compress(
        model,
        args.calibration,
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=seed,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    save_compressed(model, output, tokenizer=tokenizer, report=compressor.report, overwrite=args.overwrite)
    totals = compressor.report["totals"]
    print(
        f"compressed {args.model} -> {output} in {time.perf_counter() - started:.1f}s: kept fraction "
        f"{totals['kept_fraction']:.4f}, MoE-parameter reduction {totals['moe_reduction']:.4f}, whole-model "
        f"reduction {totals['model_reduction']:.4f}"
    )
    if args.push_to_hub:
        from .hub import HubUploadError, push_to_hub

        try:
            url = push_to_hub(output, args.push_to_hub, private=args.private)
        except HubUploadError as error:
            raise CommandError(
                f"{error}. The compressed checkpoint in {output} is complete; retry the upload"
            ) from None
        print(f"published to {url}")
    return 0


def _add_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser("evaluate", help="held-out perplexity (and routing agreement with a reference)")
    parser.add_argument("model", help="model directory or Hub id (compressed or dense)")
    parser.add_argument("--data", required=True, help="text file to evaluate on")
    parser.add_argument("--seq-len", type=_positive_int, default=512)
    parser.add_argument("--batch-size", type=_positive_int, default=4)
    parser.add_argument("--max-tokens", type=_positive_int, help="evaluate only the first N tokens")
    parser.add_argument("--reference", help="original model: also report router top-k agreement")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--record", action="store_true", help="store the result in the checkpoint's rfid_report.json and model card"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .compress.writer import REPORT_FILE
    from .evaluation import perplexity, topk_agreement

    data = Path(args.data)
    if not data.is_file():
        raise CommandError(f"evaluation data {args.data} is not a file")
    if args.record and not (Path(args.model) / REPORT_FILE).is_file():
        raise CommandError(f"--record needs a local checkpoint with {REPORT_FILE}; {args.model} has none")
    model, tokenizer = _load(args.model, args.dtype)
    if tokenizer is None:
        raise CommandError(f"{args.model} has no tokenizer")
    result: dict[str, Any] = {"model": args.model, "data": str(data), "seq_len": args.seq_len}
    routes: dict[str, Any] | None = {} if args.reference else None
    settings = {"seq_len": args.seq_len, "batch_size": args.batch_size, "max_tokens": args.max_tokens}
    result.update(perplexity(model, tokenizer, data, show_progress=not args.no_progress, routes=routes, **settings))
    if args.reference:
        reference, _ = _load(args.reference, args.dtype)
        reference_routes: dict[str, Any] = {}
        measured = perplexity(reference, tokenizer, data, routes=reference_routes, **settings)
        result["reference_perplexity"] = measured["perplexity"]
        agreement = topk_agreement(routes, reference_routes)
        result["router_topk_agreement"] = agreement["mean"]
        result["router_topk_agreement_per_layer"] = agreement["per_layer"]
    if args.record:
        _record_evaluation(Path(args.model), data, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  tokens {result['tokens']}"
        )
        if "reference_perplexity" in result:
            print(f"reference perplexity {result['reference_perplexity']:.4f}")
        if "router_topk_agreement" in result:
            print(f"router top-k agreement with {args.reference}: {result['router_topk_agreement']:.4f}")
    return 0


def _record_evaluation(directory: Path, data: Path, result: dict[str, Any]) -> None:
    """Add a measured perplexity to the checkpoint's report and regenerate its model card."""
    from .compress.writer import REPORT_FILE
    from .hub import write_model_card

    report_file = directory / REPORT_FILE
    if not report_file.is_file():
        raise CommandError(f"--record needs a local checkpoint with {REPORT_FILE}; {directory} has none")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    name = f"{data.parent.name}/{data.name}" if data.parent.name else data.name
    report.setdefault("evaluation", {})[name] = {
        "compressed": result["perplexity"],
        "dense": result.get("reference_perplexity"),
        "bits_per_byte": result["bits_per_byte"],
        "tokens": result["tokens"],
        "seq_len": result["seq_len"],
    }
    staged = report_file.with_name(f".{REPORT_FILE}.tmp")
    staged.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(staged, report_file)
    write_model_card(directory, report=report)


def _add_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser("inspect", help="ranks per layer/group and the three parameter ratios")
    parser.add_argument("model", help="compressed checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print the summary (and report) as JSON")
    parser.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from .compress.writer import REPORT_FILE
    from .report import checkpoint_summary, format_summary

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise CommandError(f"{args.model} is not a checkpoint directory (no config.json)")
    try:
        summary = checkpoint_summary(path)
    except ValueError as error:
        raise CommandError(str(error)) from error
    report_file = path / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    if args.json:
        print(json.dumps({"summary": summary, "report": report}))
    else:
        print(format_summary(summary, report))
    return 0


def _add_dequantize(subparsers: Any) -> None:
    parser = subparsers.add_parser("dequantize", help="write a plain dense checkpoint of the original architecture")
    parser.add_argument("model", help="compressed checkpoint directory or Hub id")
    parser.add_argument("--output", "-o", required=True, help="directory for the dense checkpoint")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=_dequantize)


def _dequantize(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    output = Path(args.output)
    if output.exists() and Path(args.model).exists() and output.resolve() == Path(args.model).resolve():
        raise CommandError("--output must differ from the compressed checkpoint (its weights are still being read)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise CommandError(f"{output} exists and is not empty; use --overwrite to replace it")
    model, tokenizer = _load(args.model, args.dtype)
    if not getattr(model, "is_quantized", False):
        raise CommandError(f"{args.model} is not an hf-rfid compressed checkpoint")
    dense = model.dequantize()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:  # written next to the output and renamed into place: never a half-written or mixed directory
        dense.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote dense {type(dense).__name__} to {output}")
    return 0


def _positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The `hf-rfid` argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-rfid", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hf-rfid {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_compress, _add_evaluate, _add_inspect, _add_dequantize):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-rfid` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"hf-rfid {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"hf-rfid {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
