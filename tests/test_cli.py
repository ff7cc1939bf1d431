"""The `hf-rfid` command line: compress, inspect, dequantize, evaluate; exit codes and messages on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_inputs

import hf_rfid
from hf_rfid.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hf_rfid", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("dense") / "tiny-mixtral", tied=True)


@pytest.fixture(scope="module")
def compressed_dir(dense_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compressed") / "out"
    assert main(["compress", str(dense_dir), "--output", str(output), "--keep", "0.6", "--no-progress"]) == 0
    return output


def test_compress_writes_a_loadable_checkpoint_with_report(compressed_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rfid_report.json", "README.md"):
        assert (compressed_dir / name).exists(), name
    report = json.loads((compressed_dir / "rfid_report.json").read_text())
    assert report["calibration"] is None and abs(report["totals"]["kept_fraction"] - 0.6) < 0.05
    card = (compressed_dir / "README.md").read_text()
    assert "import hf_rfid" in card and "rfid-moe" in card
    model = hf_rfid.from_pretrained(compressed_dir)
    assert isinstance(model.model.layers[1].mlp.experts, hf_rfid.FactorizedExperts)
    assert not list(compressed_dir.parent.glob(".out.*")), "no staging directory left behind"


def test_inspect_prints_ranks_and_the_three_ratios(compressed_dir, capsys):
    assert main(["inspect", str(compressed_dir)]) == 0
    out = capsys.readouterr().out
    assert "kept fraction of compressed matrices" in out
    assert "MoE-parameter reduction" in out and "whole-model parameter reduction" in out
    assert "model.layers.1.mlp.experts" in out and "gate" in out and "up" in out
    assert main(["inspect", str(compressed_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    report = json.loads((compressed_dir / "rfid_report.json").read_text())
    assert summary["totals"] == report["totals"]
    assert [m["ranks"] for layer in summary["layers"] for m in layer["matrices"].values()] == [
        m["ranks"] for layer in report["layers"] for m in layer["matrices"].values()
    ]


def test_console_script_dequantize_gives_a_checkpoint_plain_transformers_loads(compressed_dir, tmp_path):
    dense_out = tmp_path / "dense"
    result = _run("dequantize", str(compressed_dir), "--output", str(dense_out))
    assert result.returncode == 0, result.stderr
    assert "wrote dense MixtralForCausalLM" in result.stdout
    compressed = hf_rfid.from_pretrained(compressed_dir)
    expected = compressed(tiny_inputs()).logits
    # a fresh interpreter that never imports hf_rfid
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True);"
        "assert 'hf_rfid' not in sys.modules;"
        "assert not info['missing_keys'] and not info['unexpected_keys'], info;"
        "torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])"
    )
    torch.save(tiny_inputs(), tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": ""}
    check = subprocess.run(
        [sys.executable, "-c", script, str(dense_out), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert check.returncode == 0, check.stderr
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - expected).abs().max() < 1e-4


def test_evaluate_json_has_the_documented_keys(compressed_dir, dense_dir, capsys, calibration_file):
    data = Path(__file__).parent / "data" / "tiny_corpus.txt"
    args = ["evaluate", str(compressed_dir), "--data", str(data), "--seq-len", "64", "--max-tokens", "512"]
    assert main([*args, "--json", "--reference", str(dense_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "bits_per_byte", "router_topk_agreement"} <= result.keys()
    assert result["tokens"] == 512 - 8 and result["perplexity"] > 1
    assert 0 <= result["router_topk_agreement"] <= 1
    assert set(result["router_topk_agreement_per_layer"]) == {
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "/nonexistent/model", "--output", "{tmp}/x"], "nonexistent"),
        (["compress", "{dense}", "--output", "{tmp}/x", "--keep", "1.5"], r"keep must be in (0, 1]"),
        (["compress", "{dense}", "--output", "{tmp}/x", "--targets", "gate,w2"], "targets must be"),
        (["compress", "{dense}", "--output", "{tmp}/x", "--calibration", "/no/such/file.txt"], "does not exist"),
        (["compress", "{dense}", "--output", "{dense}"], "exists and is not empty"),
        (["compress", "{dense}", "--output", "{tmp}/x", "--whitening", "activation"], "need calibration data"),
        (["inspect", "{dense}"], "not an hf-rfid checkpoint"),
        (["inspect", "{tmp}"], "not a checkpoint directory"),
        (["dequantize", "{dense}", "--output", "{tmp}/y"], "not an hf-rfid compressed checkpoint"),
        (["evaluate", "{dense}", "--data", "/no/such.txt"], "is not a file"),
    ],
)
def test_bad_input_fails_with_a_clear_message(args, message, dense_dir, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, dense=dense_dir) for a in args]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--batch-size", "--num-samples", "--seq-len"])
def test_counts_must_be_positive(flag, dense_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(dense_dir), "--output", str(tmp_path / "x"), flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: 0 must be >= 1" in capsys.readouterr().err


def test_paper_preset_and_explicit_switches_reach_the_saved_config(dense_dir, tmp_path):
    output = tmp_path / "paper"
    args = ["compress", str(dense_dir), "--output", str(output), "--paper", "--xi", "0.5", "--no-progress"]
    assert main(args) == 0
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert (saved["allocation"], saved["residual"], saved["whitening"], saved["exact_budget"]) == (
        "rfid",
        "hash",
        "none",
        False,
    )
    assert saved["xi"] == 0.5 and saved["refit_coefficients"] is False


def test_dequantize_refuses_to_overwrite_its_own_input(compressed_dir, capsys):
    code = main(["dequantize", str(compressed_dir), "--output", str(compressed_dir), "--overwrite"])
    assert code == 2 and "--output must differ" in capsys.readouterr().err
    assert hf_rfid.from_pretrained(compressed_dir) is not None  # untouched


def test_saved_checkpoint_has_the_usual_permissions(compressed_dir):
    umask = os.umask(0)
    os.umask(umask)
    assert compressed_dir.stat().st_mode & 0o777 == 0o777 & ~umask


def test_console_script_reports_bad_input_with_nonzero_exit(tmp_path):
    result = _run("compress", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.returncode != 0
    assert "hf-rfid compress: error" in result.stderr and "no config.json" in result.stderr
