"""Speed and memory benchmark, measured in one run against a baseline; reports ratios.

    python benchmarks/speed.py                          # model (b), hf-rfid defaults at keep 0.6
    python benchmarks/speed.py --paper --output /tmp/speed-paper   # the paper's preset (hash residual)
    python benchmarks/speed.py --model tiny --keep 0.6 --residual blocks

1. Compression wall time split into calibration / SVD / residual+build / writing, against the time of the bare
   SVDs of the same group matrices (torch.linalg.svd only).
2. Forward time of the compressed vs the dense model: prefill (batch 4 x 512) and greedy decoding (batch 1,
   64 new tokens with KV cache).
3. `from_pretrained` time of the compressed vs the dense checkpoint.
4. Peak RSS of a compression run (in a fresh process) vs the model's size on disk.

Writes `benchmarks/results/speed.json` and `speed.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, TINY_MOE, calibration_text, set_threads, smollm_moe_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_rfid
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.allocation import group_experts, routing_frequencies
from hf_rfid.compress.writer import save_compressed
from hf_rfid.modeling import ExpertsLayout, find_experts_modules


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        tick = time.perf_counter()
        function()
        samples.append(time.perf_counter() - tick)
    return statistics.median(samples)


def bare_svd_seconds(model: torch.nn.Module, config: RFIDMoEConfig, counts: dict[str, list[int]]) -> float:
    """Time of torch.linalg.svd on every stacked group matrix the compressor factorises (nothing else)."""
    total = 0.0
    for name, experts in find_experts_modules(model):
        info = ExpertsLayout.of(experts)
        groups = group_experts(routing_frequencies(counts.get(name, [0] * info.num_experts)), config.group_size)
        matrices = info.read_matrices(experts)
        for matrix_type in config.targets:
            for members in groups:
                stacked = matrices[matrix_type][members].reshape(-1, info.shape(matrix_type)[1]).float()
                tick = time.perf_counter()
                torch.linalg.svd(stacked, full_matrices=False)
                total += time.perf_counter() - tick
    return total


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix == ".safetensors")


PEAK_SCRIPT = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import torch
torch.set_num_threads(int(sys.argv[5]))
from transformers import AutoModelForCausalLM, AutoTokenizer
import hf_rfid
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress.writer import save_compressed
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
baseline = rss()
config = RFIDMoEConfig(**json.loads(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')
loaded = rss()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
RFIDCompressor(config).compress(model, sys.argv[2], tokenizer=tokenizer, num_samples=int(sys.argv[6]), seq_len=512,
                                show_progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": baseline, "after_load_rss": loaded, "peak_rss": peak}))
"""


def peak_rss(model_dir: Path, overrides: dict, threads: int, num_samples: int) -> dict[str, int]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_SCRIPT,
            str(model_dir),
            str(calibration_text()),
            json.dumps(overrides),
            str(Path(__file__).parent),
            str(threads),
            str(num_samples),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe", help="smollm2-moe, tiny, or a checkpoint directory")
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--paper", action="store_true", help="RFIDMoEConfig.paper() instead of the defaults")
    parser.add_argument("--residual", default=None, help="override the residual kind (default: the config's)")
    parser.add_argument("--whitening", default=None, help="override the whitening (default: the config's)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    threads = set_threads()
    hf_rfid.register()
    model_dir = {"smollm2-moe": smollm_moe_dir, "tiny": lambda: TINY_MOE}.get(args.model, lambda: Path(args.model))()
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    overrides: dict[str, Any] = {"keep": args.keep}
    if args.residual:
        overrides["residual"] = args.residual
    if args.whitening:
        overrides["whitening"] = args.whitening
    config = RFIDMoEConfig.paper(**overrides) if args.paper else RFIDMoEConfig(**overrides)
    overrides = {k: v for k, v in config.to_dict().items() if k not in ("quant_method", "compressed_modules")}
    print(f"model {model_dir}, {threads} threads, config {overrides}", flush=True)

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    compressor = RFIDCompressor(config)
    compressed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tick = time.perf_counter()
    compressor.compress(
        compressed,
        calibration_text(),
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        seq_len=512,
        show_progress=False,
    )
    compress_seconds = time.perf_counter() - tick
    work = Path(tempfile.mkdtemp(prefix="hf-rfid-speed-"))
    try:
        stored_dtype = AutoConfig.from_pretrained(model_dir).dtype  # save at the checkpoint's precision
        tick = time.perf_counter()
        save_compressed(compressed.to(stored_dtype), work / "compressed", tokenizer=tokenizer, report=compressor.report)
        write_seconds = time.perf_counter() - tick
        counts = {layer["module"]: layer["routing_counts"] for layer in compressor.report["layers"]}
        svd_seconds = bare_svd_seconds(dense, config, counts)
        timings = compressor.report["timings"]

        generator = torch.Generator().manual_seed(0)
        prefill = torch.randint(0, dense.config.vocab_size, (4, 512), generator=generator)
        prompt = torch.randint(0, dense.config.vocab_size, (1, 32), generator=generator)

        def run_prefill(model):
            with torch.no_grad():
                model(input_ids=prefill, use_cache=False)

        def run_decode(model):
            with torch.no_grad():
                model.generate(
                    prompt,
                    max_new_tokens=args.decode_tokens,
                    min_new_tokens=args.decode_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        reloaded = AutoModelForCausalLM.from_pretrained(work / "compressed", dtype=dtype).eval()
        forward = {}
        for label, function in (("prefill", run_prefill), ("decode", run_decode)):
            forward[label] = {
                "dense_s": _median_seconds(lambda f=function: f(dense), args.repeats),
                "compressed_s": _median_seconds(lambda f=function: f(reloaded), args.repeats),
            }
            forward[label]["ratio"] = forward[label]["compressed_s"] / forward[label]["dense_s"]
            print(f"{label}: compressed / dense = {forward[label]['ratio']:.2f}", flush=True)
        load = {
            "dense_s": _median_seconds(lambda: AutoModelForCausalLM.from_pretrained(model_dir), args.repeats),
            "compressed_s": _median_seconds(
                lambda: AutoModelForCausalLM.from_pretrained(work / "compressed"), args.repeats
            ),
        }
        load["ratio"] = load["compressed_s"] / load["dense_s"]
        memory = peak_rss(model_dir, overrides, threads, args.num_samples)
        disk = directory_bytes(model_dir)
        memory.update(
            {
                "dense_checkpoint_bytes": disk,
                "compressed_checkpoint_bytes": directory_bytes(work / "compressed"),
                "peak_over_checkpoint": memory["peak_rss"] / disk,
                "peak_minus_baseline_over_checkpoint": (memory["peak_rss"] - memory["baseline_rss"]) / disk,
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    compression = {
        "total_s": compress_seconds + write_seconds,
        "calibration_s": timings["calibration_s"],
        "svd_s": timings["svd_s"],
        "residual_and_build_s": timings["residual_s"],
        "writing_s": write_seconds,
        "bare_svd_s": svd_seconds,
    }
    compression["total_over_bare_svd"] = compression["total_s"] / svd_seconds
    result = {
        "model": str(model_dir),
        "config": overrides,
        "threads": threads,
        "dtype": args.dtype,
        "machine": platform.platform(),
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "compression": compression,
        "decode_tokens": args.decode_tokens,
        "forward": forward,
        "from_pretrained": load,
        "memory": memory,
        "max_rss_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    name = "speed" if args.model == "smollm2-moe" else f"speed_{Path(args.model).name}"
    (output / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (output / f"{name}.md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))
    return 0


def to_markdown(result: dict[str, Any]) -> str:
    c, f, load, m = result["compression"], result["forward"], result["from_pretrained"], result["memory"]
    share = {k: c[k] / c["total_s"] for k in ("calibration_s", "svd_s", "residual_and_build_s", "writing_s")}
    return "\n".join(
        [
            f"Command: `{result['command']}` ({result['threads']} threads, {result['machine']})",
            "",
            "| measurement | ratio | detail |",
            "|---|---|---|",
            f"| compression time / bare SVD time | {c['total_over_bare_svd']:.1f} | calibration "
            f"{share['calibration_s']:.0%}, SVD {share['svd_s']:.0%}, "
            f"residual+build {share['residual_and_build_s']:.0%}, writing {share['writing_s']:.0%} of the total |",
            f"| prefill 4x512, compressed / dense | {f['prefill']['ratio']:.2f} | |",
            f"| decode 1x{result['decode_tokens']} tokens with KV cache, compressed / dense | "
            f"{f['decode']['ratio']:.2f} | |",
            f"| from_pretrained, compressed / dense | {load['ratio']:.2f} | |",
            f"| peak RSS while compressing / dense checkpoint size | {m['peak_over_checkpoint']:.2f} | "
            f"{(m['peak_minus_baseline_over_checkpoint']):.2f} without the Python + torch baseline |",
            f"| compressed / dense checkpoint size | "
            f"{m['compressed_checkpoint_bytes'] / m['dense_checkpoint_bytes']:.2f} | |",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
