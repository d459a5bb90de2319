"""Checkpoint loading: strict keys, recomputable buffers, hub ids through a local cache, presets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_package import KronosForecaster
from model_package.kronos import (
    PRESETS,
    CheckpointError,
    Kronos,
    KronosTokenizer,
    count_parameters,
    load_model,
    load_tokenizer,
)
from model_package.kronos.checkpoint import WEIGHTS_FILE


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(directory: Path, edit) -> None:
    state = load_file(str(directory / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(directory / WEIGHTS_FILE))


def test_round_trip_keeps_every_weight(tiny_checkpoints):
    tokenizer_dir, model_dir = tiny_checkpoints
    model = load_model(model_dir)
    stored = load_file(str(model_dir / WEIGHTS_FILE))
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    assert not model.training and not load_tokenizer(tokenizer_dir).training


def test_renamed_weight_is_named_in_the_error(tiny_checkpoints, tmp_path):
    model_dir = _copy(tiny_checkpoints[1], tmp_path / "model")
    _edit_weights(model_dir, lambda s: s.update({"head.proj_s2.wieght": s.pop("head.proj_s2.weight")}))
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    assert "missing keys: head.proj_s2.weight" in str(err.value)
    assert "unexpected keys: head.proj_s2.wieght" in str(err.value)


def test_missing_weight_is_named_in_the_error(tiny_checkpoints, tmp_path):
    tokenizer_dir = _copy(tiny_checkpoints[0], tmp_path / "tokenizer")
    _edit_weights(tokenizer_dir, lambda s: s.pop("encoder.1.ffn.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.1\.ffn\.w3\.weight"):
        load_tokenizer(tokenizer_dir)


def test_wrong_shape_is_named_in_the_error(tiny_checkpoints, tmp_path):
    model_dir = _copy(tiny_checkpoints[1], tmp_path / "model")
    _edit_weights(model_dir, lambda s: s.update({"norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"norm\.weight \(7,\) != \(48,\)"):
        load_model(model_dir)


def test_recomputed_buffers_may_be_absent_and_are_ignored_when_present(tiny_checkpoints, tmp_path):
    model_dir = _copy(tiny_checkpoints[1], tmp_path / "model")
    tokenizer_dir = _copy(tiny_checkpoints[0], tmp_path / "tokenizer")
    _edit_weights(model_dir, lambda s: [s.pop(k) for k in list(s) if k.endswith("rotary.inv_freq")])
    _edit_weights(tokenizer_dir, lambda s: s.update({"tokenizer.bsq.basis": torch.zeros(16, dtype=torch.long)}))
    model, tokenizer = load_model(model_dir), load_tokenizer(tokenizer_dir)
    reference = load_model(tiny_checkpoints[1])
    assert torch.equal(model.rotary.inv_freq, reference.rotary.inv_freq)
    assert tokenizer.tokenizer.bsq.basis.tolist() == [2**i for i in range(15, -1, -1)]


def test_config_with_unknown_key_is_refused(tiny_checkpoints, tmp_path):
    model_dir = _copy(tiny_checkpoints[1], tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["n_experts"] = 4
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected \\['n_experts'\\]"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NeoQuasar/Kronos-mini", 4_108_032),
        ("NeoQuasar/Kronos-small", 24_741_376),
        ("NeoQuasar/Kronos-base", 102_310_592),
    ],
)
def test_preset_parameter_counts(name, expected):
    assert count_parameters(Kronos(PRESETS[name].model_config)) == expected


def test_tokenizer_preset_parameter_count():
    assert count_parameters(KronosTokenizer(PRESETS["NeoQuasar/Kronos-small"].tokenizer_config)) == 3_958_042


def _fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """Lay a checkpoint out the way huggingface_hub caches a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_ids_resolve_offline_from_the_cache_with_preset_pairing(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "NeoQuasar/Kronos-small", tiny_checkpoints[1])
    _fake_hub_cache(cache, "NeoQuasar/Kronos-Tokenizer-base", tiny_checkpoints[0])
    forecaster = KronosForecaster.from_pretrained(None, "NeoQuasar/Kronos-small", cache_dir=cache, device="cpu")
    assert forecaster.max_context == 512
    assert forecaster.source["tokenizer"] == "NeoQuasar/Kronos-Tokenizer-base"
    _fake_hub_cache(cache, "NeoQuasar/Kronos-mini", tiny_checkpoints[1])
    _fake_hub_cache(cache, "NeoQuasar/Kronos-Tokenizer-2k", tiny_checkpoints[0])
    mini = KronosForecaster.from_pretrained(model="NeoQuasar/Kronos-mini", cache_dir=cache, device="cpu")
    assert (mini.max_context, mini.source["tokenizer"]) == (2048, "NeoQuasar/Kronos-Tokenizer-2k")


def test_uncached_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        load_model("NeoQuasar/Kronos-base", cache_dir=tmp_path / "empty")


def test_local_directory_max_context_follows_the_shape(tiny_checkpoints):
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, device="cpu")
    assert forecaster.max_context == 512
    assert KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=64).max_context == 64
