"""After compression: LoRA (PEFT 0.21), merging, factor fine-tuning, and the Hub round trip (a real HTTP server)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fake_hub import FakeHub
from tiny_models import TEXT_FIXTURE, save_tiny, tiny_inputs, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import hf_rfid
import hf_rfid.peft as rfid_peft
from hf_rfid import RFIDCompressor, RFIDMoEConfig
from hf_rfid.cli import main
from hf_rfid.hub import HubUploadError, build_model_card

peft = pytest.importorskip("peft")

ATTENTION = {
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
}


@pytest.fixture(scope="module")
def compressed_dirs(tmp_path_factory):
    dirs = {}
    for model_type in ATTENTION:
        model = RFIDCompressor(RFIDMoEConfig(keep=0.6, residual="hash")).compress(
            tiny_model(model_type), show_progress=False
        )
        dirs[model_type] = tmp_path_factory.mktemp(model_type) / "compressed"
        model.save_pretrained(dirs[model_type])
    return dirs


def _lora_modules(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}


def _loss(model, inputs):
    return model(input_ids=inputs, labels=inputs).loss


@pytest.mark.parametrize("model_type", list(ATTENTION))
def test_lora_wraps_exactly_the_attention_and_factor_layers(model_type, compressed_dirs):
    model = hf_rfid.from_pretrained(compressed_dirs[model_type])
    expected = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and (
            (".self_attn." in name and leaf in ATTENTION[model_type]) or rfid_peft.FACTOR_PATTERN.match(name)
        ):
            expected.add(name)
    wrapped = rfid_peft.get_peft_model(model)
    assert _lora_modules(wrapped) == expected
    assert not any("shared_expert" in n or n.endswith(".gate") or "router" in n for n in _lora_modules(wrapped))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_without_the_guard_peft_would_rewrite_moe_targets(compressed_dirs):
    """The trap the guard exists for: PEFT's v5 rewrite fails on a factorised DeepSeek-V3."""
    model = hf_rfid.from_pretrained(compressed_dirs["deepseek_v3"])
    config = peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"])
    with pytest.raises(ValueError):
        peft.get_peft_model(model, config)
    config = peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"])
    wrapped = rfid_peft.get_peft_model(hf_rfid.from_pretrained(compressed_dirs["deepseek_v3"]), config)
    assert any("shared_experts.gate_proj" in name for name in _lora_modules(wrapped))


@pytest.mark.parametrize("model_type", list(ATTENTION))
def test_lora_trains_saves_reloads_and_merges_exactly(model_type, compressed_dirs, tmp_path):
    inputs = tiny_inputs(batch=4, length=16)
    model = hf_rfid.from_pretrained(compressed_dirs[model_type])
    config = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"o_proj": 2}, task_type="CAUSAL_LM")
    wrapped = rfid_peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    before = float(_loss(wrapped, inputs))
    for _ in range(5):
        optimizer.zero_grad()
        _loss(wrapped, inputs).backward()
        optimizer.step()
    assert float(_loss(wrapped, inputs)) < before
    wrapped.eval()
    expected = wrapped(inputs).logits.detach()
    wrapped.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] == {"o_proj": 2}

    reloaded = rfid_peft.from_pretrained(hf_rfid.from_pretrained(compressed_dirs[model_type]), tmp_path / "adapter")
    assert torch.equal(reloaded(inputs).logits, expected)

    merged = reloaded.merge_and_unload()
    ranks = [b.weight.shape[0] for n, b in merged.named_modules() if n.endswith("gate.bases.0")]
    assert ranks == [b.weight.shape[0] for n, b in model.named_modules() if n.endswith("gate.bases.0")]
    assert (merged(inputs).logits - expected).abs().max() < 1e-4
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "rfid_moe"
    again = hf_rfid.from_pretrained(tmp_path / "merged")
    assert torch.equal(again(inputs).logits, merged(inputs).logits)


def test_training_the_factors_without_adapters(compressed_dirs):
    inputs = tiny_inputs(batch=4, length=16)
    model = hf_rfid.from_pretrained(compressed_dirs["mixtral"])
    trainable = rfid_peft.freeze_all_but_factors(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert names and all(".experts." in n for n in names) and any("residual.codes" in n for n in names)
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)  # what Trainer checks: no "purely quantized" error
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = float(_loss(model, inputs))
    for _ in range(5):
        optimizer.zero_grad()
        _loss(model, inputs).backward()
        optimizer.step()
    assert float(_loss(model, inputs)) < before


# --------------------------------------------------------------------------------------------------- the Hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # no real back-off waits on HTTP 500
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.close()


TOKEN = "hf_SECRETtoken1234567890"


def test_push_to_hub_then_load_by_repo_id(hub, tmp_path, caplog, capsys):
    model = RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(
        tiny_model("qwen3_moe"),
        TEXT_FIXTURE,
        tokenizer=tiny_tokenizer(),
        num_samples=4,
        seq_len=32,
        show_progress=False,
    )
    expected = model(tiny_inputs()).logits
    with caplog.at_level(logging.DEBUG):
        url = model.push_to_hub("acme/tiny-rfid", token=TOKEN)
    repo = hub.state.repos["acme/tiny-rfid"]
    assert len(repo.commits) == 1 and url.endswith(repo.commits[0]["oid"])
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "rfid_report.json",
        "rfid_allocation.png",
        "README.md",
    } <= set(repo.files)
    card = repo.files["README.md"].decode()
    assert "base_model_relation" not in card  # a local base model is not a Hub id
    assert "rfid-moe" in card and "pip install hf-rfid" in card and "import hf_rfid" in card
    loaded = AutoModelForCausalLM.from_pretrained("acme/tiny-rfid", cache_dir=tmp_path / "cache", token=TOKEN)
    assert torch.equal(loaded(tiny_inputs()).logits, expected)
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err


def test_cli_push_to_hub_private(hub, tmp_path, capsys):
    dense = save_tiny("mixtral", tmp_path / "dense")
    args = [
        "compress",
        str(dense),
        "--output",
        str(tmp_path / "out"),
        "--keep",
        "0.5",
        "--no-progress",
        "--push-to-hub",
        "acme/cli-rfid",
        "--private",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", TOKEN)
        assert main(args) == 0
    repo = hub.state.repos["acme/cli-rfid"]
    assert repo.private and len(repo.commits) == 1
    assert set((tmp_path / "out").iterdir()) and "model.safetensors" in repo.files
    out = capsys.readouterr()
    assert "published to" in out.out and TOKEN not in out.out + out.err


def test_failed_upload_keeps_local_files_and_explains(hub, tmp_path, capsys):
    dense = save_tiny("mixtral", tmp_path / "dense")
    hub.state.fail_commits = 100  # the commit endpoint answers HTTP 500 after the preupload step
    args = [
        "compress",
        str(dense),
        "--output",
        str(tmp_path / "out"),
        "--keep",
        "0.5",
        "--no-progress",
        "--push-to-hub",
        "acme/broken",
    ]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "uploading" in err and "acme/broken failed" in err and "500" in err
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert hf_rfid.from_pretrained(tmp_path / "out") is not None
    assert not hub.state.repos["acme/broken"].commits
    with pytest.raises(HubUploadError):
        hf_rfid.from_pretrained(tmp_path / "out").push_to_hub("acme/broken", token=TOKEN)


def test_model_card_metadata_renders():
    from huggingface_hub import ModelCard

    report = {
        "base_model": "mistralai/Mixtral-8x7B-v0.1",
        "config": {"keep": 0.6, "allocation": "rfid", "group_size": 4},
        "calibration": {"num_samples": 128, "seq_len": 512, "source": "wikitext2", "seed": 0},
        "totals": {
            "kept_fraction": 0.6,
            "moe_reduction": 0.27,
            "moe_parameters_before": 100,
            "moe_parameters_after": 73,
            "model_reduction": 0.25,
            "model_parameters_before": 120,
            "model_parameters_after": 90,
        },
        "layers": [{"layer": 0, "matrices": {"gate": {"ranks": [9, 7]}}}],
        "evaluation": {"wiki": {"dense": 3.5, "compressed": 4.25}},
    }
    card = ModelCard(build_model_card(report, tags=["extra"]))
    assert card.data.base_model == "mistralai/Mixtral-8x7B-v0.1"
    assert card.data.base_model_relation == "quantized"
    assert {"rfid-moe", "moe", "low-rank", "extra"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert "| wiki | 3.500 | 4.250 |" in card.text and "0.2700" in card.text and "| 0 | gate | 9 7 |" in card.text


def test_push_to_hub_rejects_arguments_it_cannot_honour():
    model = RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(tiny_model("mixtral"), show_progress=False)
    with pytest.raises(TypeError, match="does not support \\['variant'\\]"):
        model.push_to_hub("acme/x", variant="fp16")
    with pytest.raises(ValueError, match="safetensors only"):
        model.push_to_hub("acme/x", safe_serialization=False)
