"""The calibrated compressor end to end: data sources, routing counts, report, figure, determinism, options."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model, tiny_tokenizer

import hf_rfid
from hf_rfid import CalibrationDataError, RFIDCompressor, RFIDMoEConfig
from hf_rfid.compress import calibration as calibration_module
from hf_rfid.compress.calibration import build_windows, load_documents, prepare_calibration
from hf_rfid.compress.writer import FIGURE_FILE, REPORT_FILE, save_compressed
from hf_rfid.modeling import find_experts_modules
from hf_rfid.modeling.adapters import parent_block, router_of


def _windows(calibration_file, num_samples=8, seq_len=64, seed=0):
    return prepare_calibration(calibration_file, tiny_tokenizer(), num_samples, seq_len, seed)


# ----------------------------------------------------------------------------------------- calibration data


def test_text_file_folder_jsonl_and_list_give_documents(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nSecond one,\nstill second.\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "Third."}\n\n{"text": "Fourth.", "id": 4}\n')
    assert load_documents(tmp_path / "a.txt") == ["First document.", "Second one,\nstill second."]
    assert load_documents(tmp_path / "b.jsonl") == ["Third.", "Fourth."]
    assert load_documents(tmp_path) == ["First document.", "Second one,\nstill second.", "Third.", "Fourth."]
    assert load_documents(["x", "  ", "y"]) == ["x", "y"]


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"text": "ok"}\n{broken\n', r"b\.jsonl:2 is not valid JSON"), ('{"body": "x"}\n', "has no string field 'text'")],
)
def test_bad_jsonl_lines_are_reported(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        load_documents(tmp_path / "b.jsonl")


def test_unknown_source_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="not a file, a folder, a list of strings or one of the datasets"):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(CalibrationDataError, match="holds no .txt or .jsonl"):
        load_documents(tmp_path)


def test_too_little_text_states_found_and_needed_tokens():
    with pytest.raises(CalibrationDataError, match=r"has \d+ tokens but 64 samples x 512 tokens need 32768"):
        build_windows(["a short text"] * 3, tiny_tokenizer(), 64, 512)


def test_windows_are_seeded_and_non_overlapping(calibration_file):
    first = _windows(calibration_file, seed=1)
    assert first.input_ids.shape == (8, 64) and first.num_tokens == 8 * 64
    assert torch.equal(first.input_ids, _windows(calibration_file, seed=1).input_ids)
    assert not torch.equal(first.input_ids, _windows(calibration_file, seed=2).input_ids)
    rows = {tuple(row.tolist()) for row in first.input_ids}
    assert len(rows) == 8


def test_dataset_names_go_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, subset, split, streaming):
        calls.append((name, subset, split))
        return {"text": ["alpha beta", "", "gamma"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents("wikitext2") == ["alpha beta", "gamma"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train")]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationDataError, match="could not load the 'ptb' dataset.*local text/JSONL file"):
        calibration_module.load_documents("ptb")


# ------------------------------------------------------------------------------------------ routing counts


def _independent_router_counts(model, input_ids, attention_mask=None):
    counts, hooks = {}, []
    mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
    for name, _ in find_experts_modules(model):
        router = router_of(parent_block(model, name))

        def hook(module, args, output, name=name):
            index = output[2].reshape(-1, output[2].shape[-1])
            if mask is not None:
                index = index[mask]
            counts[name] = counts.get(name, 0) + torch.bincount(index.reshape(-1), minlength=8)

        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in hooks:
        handle.remove()
    return {name: value.tolist() for name, value in counts.items()}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "qwen3_next"])
def test_routing_counts_equal_an_independent_count_of_the_router_outputs(model_type, calibration_file):
    windows = _windows(calibration_file)
    expected = _independent_router_counts(tiny_model(model_type), windows.input_ids)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6, propagate="original"))
    compressor.compress(tiny_model(model_type), {"input_ids": windows.input_ids}, show_progress=False, batch_size=3)
    counted = {layer["module"]: layer["routing_counts"] for layer in compressor.report["layers"]}
    assert counted == expected
    for layer in compressor.report["layers"]:
        assert layer["tokens"] == windows.num_tokens
        assert sum(layer["routing_frequencies"]) == pytest.approx(1.0)


def test_masked_tokens_are_never_counted(calibration_file):
    windows = _windows(calibration_file)
    mask = torch.ones_like(windows.input_ids)
    mask[:, 40:] = 0  # right padding
    mask[3] = 0  # a whole padded sample
    expected = _independent_router_counts(tiny_model("mixtral"), windows.input_ids, mask)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6, propagate="original"))
    batch = {"input_ids": windows.input_ids, "attention_mask": mask}
    compressor.compress(tiny_model("mixtral"), batch, show_progress=False, batch_size=4)
    for layer in compressor.report["layers"]:
        assert layer["tokens"] == int(mask.sum())
        assert sum(layer["routing_counts"]) == 2 * int(mask.sum())
        assert layer["routing_counts"] == expected[layer["module"]]


def test_compressed_propagation_sees_the_compressed_first_layer(calibration_file):
    windows = _windows(calibration_file)
    reports = {}
    for propagate in ("original", "compressed"):
        compressor = RFIDCompressor(RFIDMoEConfig(keep=0.3, propagate=propagate))
        compressor.compress(tiny_model("mixtral"), {"input_ids": windows.input_ids}, show_progress=False)
        reports[propagate] = compressor.report["layers"]
    assert reports["original"][0]["routing_counts"] == reports["compressed"][0]["routing_counts"]
    assert reports["original"][1]["routing_counts"] != reports["compressed"][1]["routing_counts"]


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_calibrated_compression_saves_reloads_and_reports(model_type, calibration_file, tmp_path):
    model = tiny_model(model_type)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.5))
    compressed = compressor.compress(
        model, calibration_file, tokenizer=tiny_tokenizer(), num_samples=8, seq_len=64, show_progress=False
    )
    expected = compressed(tiny_inputs()).logits
    save_compressed(compressed, tmp_path / "out", tokenizer=tiny_tokenizer(), report=compressor.report)
    loaded = hf_rfid.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded(tiny_inputs()).logits, expected)
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert (tmp_path / "out" / FIGURE_FILE).stat().st_size > 1000
    assert report["calibration"]["num_samples"] == 8 and report["calibration"]["tokens"] == 8 * 64
    layer = report["layers"][0]
    assert {"routing_frequencies", "groups", "tokens", "matrices"} <= layer.keys()
    gate = layer["matrices"]["gate"]
    for key in ("effective_ranks", "scores", "ranks", "relative_error", "group_frequencies"):
        assert len(gate[key]) == (len(layer["groups"]) if key != "relative_error" else 8), key
    # weight-space errors: the defaults minimise the activation error instead, so they may exceed plain SVD's
    assert all(0 < error < 1.5 for error in gate["relative_error"])
    assert {"kept_fraction", "moe_reduction", "model_reduction"} <= report["totals"].keys()
    assert report["timings"]["calibration_s"] > 0 and report["timings"]["svd_s"] > 0


def test_same_inputs_and_seed_give_a_bit_identical_checkpoint(calibration_file, tmp_path):
    digests = []
    for run in range(2):
        model = tiny_model("qwen3_moe")
        compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6, residual="hash", seed=5))
        compressor.compress(
            model, calibration_file, tokenizer=tiny_tokenizer(), num_samples=8, seq_len=64, show_progress=False
        )
        save_compressed(model, tmp_path / str(run), report=compressor.report, figure=False)
        digests.append(hashlib.sha256((tmp_path / str(run) / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_data_free_compression_warns_and_counts_experts_equally():
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.6))
    with pytest.warns(UserWarning, match="no calibration data: compressing data-free"):
        compressor.compress(tiny_model("olmoe"), show_progress=False)
    layer = compressor.report["layers"][0]
    assert layer["routing_frequencies"] == [0.125] * 8 and layer["routing_counts"] is None
    assert compressor.report["calibration"] is None
    assert any("data-free" in warning for warning in compressor.report["warnings"])


def test_rarely_routed_experts_fall_back_to_weight_only_whitening(calibration_file):
    windows = _windows(calibration_file, num_samples=2, seq_len=16)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.5, whitening="activation", group_size=1, min_expert_tokens=12))
    with pytest.warns(UserWarning, match="fewer than 12 routed calibration tokens"):
        compressor.compress(tiny_model("mixtral"), {"input_ids": windows.input_ids}, show_progress=False)
    layer = compressor.report["layers"][0]
    rare = [e for e, count in enumerate(layer["routing_counts"]) if count < 12]
    assert rare
    weight_only = {layer["groups"][g][0] for g in layer["matrices"]["gate"]["weight_only_groups"]}
    assert weight_only == set(rare)
    assert all(r >= 1 for r in layer["matrices"]["gate"]["ranks"])


def test_whitening_lowers_the_activation_error(calibration_file):
    windows = _windows(calibration_file)
    losses = {}
    for whitening in ("none", "activation"):
        model = tiny_model("mixtral")
        RFIDCompressor(RFIDMoEConfig(keep=0.5, whitening=whitening, residual="none")).compress(
            model, {"input_ids": windows.input_ids}, show_progress=False
        )
        reference = tiny_model("mixtral")
        with torch.no_grad():
            losses[whitening] = float((model(windows.input_ids).logits - reference(windows.input_ids).logits).norm())
    assert losses["activation"] < losses["none"]


def test_global_budget_pools_layers_and_still_hits_the_total(calibration_file):
    windows = _windows(calibration_file)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.5, budget_scope="global", residual="none"))
    compressor.compress(tiny_model("mixtral"), {"input_ids": windows.input_ids}, show_progress=False)
    totals = compressor.report["totals"]
    budget = 0.5 * totals["original_compressed_parameters"]
    unit = 4 * 32 + 64
    groups = sum(len(layer["groups"]) for layer in compressor.report["layers"]) * 2
    assert budget - groups * unit <= totals["stored_compressed_parameters"] <= budget
    kept = [m["kept_fraction"] for layer in compressor.report["layers"] for m in layer["matrices"].values()]
    assert max(kept) - min(kept) > 0.005  # layers are no longer forced to the same fraction


@pytest.mark.parametrize(("allocation", "xi"), [("frequency", 0.0), ("erank", 1.0), ("rfid", 0.8)])
def test_allocation_switches_follow_their_signal(allocation, xi, calibration_file):
    windows = _windows(calibration_file, num_samples=16)
    compressor = RFIDCompressor(RFIDMoEConfig(keep=0.5, allocation=allocation, group_size=2, residual="none"))
    compressor.compress(tiny_model("mixtral"), {"input_ids": windows.input_ids}, show_progress=False)
    for layer in compressor.report["layers"]:
        gate = layer["matrices"]["gate"]
        from hf_rfid.compress.allocation import fused_scores

        assert gate["scores"] == pytest.approx(fused_scores(gate["effective_ranks"], gate["group_frequencies"], xi))
        if allocation == "frequency":  # most routed group first, ranks follow frequency
            assert gate["ranks"] == sorted(gate["ranks"], reverse=True)


def test_down_projection_can_be_targeted(calibration_file):
    windows = _windows(calibration_file)
    model = tiny_model("qwen2_moe")
    RFIDCompressor(RFIDMoEConfig(keep=0.5, targets=["gate", "up", "down"], whitening="activation")).compress(
        model, {"input_ids": windows.input_ids}, show_progress=False
    )
    experts = model.model.layers[0].mlp.experts
    assert experts.compressed_types == ["gate", "up", "down"]


def test_progress_bar_names_layer_and_phase(calibration_file, capsys):
    windows = _windows(calibration_file)
    RFIDCompressor(RFIDMoEConfig(keep=0.6)).compress(tiny_model("mixtral"), {"input_ids": windows.input_ids})
    err = capsys.readouterr().err
    assert "layer 2/2: calibrating" in err and "factorising" in err


def test_one_statistics_pass_serves_several_compressions(calibration_file):
    windows = _windows(calibration_file)
    calibration = {"input_ids": windows.input_ids}
    collector = RFIDCompressor(RFIDMoEConfig(whitening="activation", propagate="original"))
    statistics = collector.collect_statistics(tiny_model("mixtral"), calibration, show_progress=False)
    for keep in (0.4, 0.7):
        config = RFIDMoEConfig(keep=keep, whitening="activation", propagate="original")
        reused = RFIDCompressor(config).compress(tiny_model("mixtral"), statistics=statistics, show_progress=False)
        direct = RFIDCompressor(config).compress(tiny_model("mixtral"), calibration, show_progress=False)
        assert reused.state_dict().keys() == direct.state_dict().keys()
        assert all(torch.equal(reused.state_dict()[k], direct.state_dict()[k]) for k in reused.state_dict())
        assert reused.rfid_report["calibration"]["reused_statistics"] is True
    with pytest.raises(ValueError, match="use propagate='original'"):
        RFIDCompressor(RFIDMoEConfig()).compress(tiny_model("mixtral"), statistics=statistics)
    weight_only_config = RFIDMoEConfig(propagate="original", whitening="none", refit_coefficients=False)
    weight_only = RFIDCompressor(weight_only_config).collect_statistics(
        tiny_model("mixtral"), calibration, show_progress=False
    )
    with pytest.raises(ValueError, match="hold no input Grams"):
        RFIDCompressor(RFIDMoEConfig(residual="fit", propagate="original")).compress(
            tiny_model("mixtral"), statistics=weight_only
        )


def test_coefficient_refit_lowers_each_experts_activation_error(calibration_file):
    windows = _windows(calibration_file, num_samples=16)
    calibration = {"input_ids": windows.input_ids}
    config = {"keep": 0.5, "whitening": "activation", "residual": "none", "propagate": "original"}
    statistics = RFIDCompressor(RFIDMoEConfig(**config)).collect_statistics(
        tiny_model("qwen3_moe"), calibration, show_progress=False
    )
    models = {}
    for refit in (False, True):
        models[refit] = RFIDCompressor(RFIDMoEConfig(**config, refit_coefficients=refit)).compress(
            tiny_model("qwen3_moe"), statistics=statistics, show_progress=False
        )
    original = tiny_model("qwen3_moe")
    from hf_rfid.compress.factorize import relative_error
    from hf_rfid.modeling import ExpertsLayout

    for name, experts in find_experts_modules(original):
        weights = ExpertsLayout.of(experts).read_matrices(experts)["gate"]
        stats = statistics.modules[name]
        plain = models[False].get_submodule(name).materialize()["gate"]
        refitted = models[True].get_submodule(name).materialize()["gate"]
        for expert, gram in stats.hidden_grams.items():
            before = relative_error(weights[expert], plain[expert], gram)
            after = relative_error(weights[expert], refitted[expert], gram)
            assert after <= before + 1e-9
    with pytest.raises(ValueError, match="refit_coefficients=True need calibration data"):
        RFIDCompressor(RFIDMoEConfig(refit_coefficients=True)).compress(tiny_model("mixtral"))


def test_a_tokenizer_batch_encoding_is_accepted_as_calibration():
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(["the quick brown fox jumps", "over the lazy dog again"], return_tensors="pt", padding=True)
    batch = prepare_calibration(encoded, None, num_samples=2, seq_len=8, seed=0)
    assert torch.equal(batch.input_ids, encoded["input_ids"])
    assert torch.equal(batch.attention_mask, encoded["attention_mask"])


def test_a_mistyped_evaluation_path_is_an_error_not_text():
    from hf_rfid.evaluation import read_text

    with pytest.raises(FileNotFoundError, match="no such file: data/tset.txt"):
        read_text("data/tset.txt")
    assert read_text("a short text, not a path.txt") == "a short text, not a path.txt"
