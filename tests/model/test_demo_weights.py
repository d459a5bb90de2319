"""The shipped demo model (model_package/demo_weights): loadable, small, trained on what its
card says, and its forecasts on held-out data are real numbers that repair into valid bars."""

from __future__ import annotations

import json

import numpy as np

from model_package import KronosForecaster
from model_package.demo import DEMO_DIR, DEMO_MAX_CONTEXT, DEMO_MODEL_CONFIG, DEMO_TOKENIZER_CONFIG, demo_checkpoints
from model_package.kronos import load_model, load_tokenizer
from model_package.windows import data_digest
from registry_scripts.demo_model import HOLDOUT_START, split_data

MAX_BYTES = 10 * 1000 * 1000


def test_demo_weights_load_strictly_and_fit_the_budget():
    tokenizer_dir, model_dir = demo_checkpoints()
    assert load_tokenizer(tokenizer_dir).config == DEMO_TOKENIZER_CONFIG
    assert load_model(model_dir).config == DEMO_MODEL_CONFIG
    size = sum((d / "model.safetensors").stat().st_size for d in (tokenizer_dir, model_dir))
    assert size <= MAX_BYTES, f"demo weights take {size} bytes"
    for name in ("MODEL_CARD.md", "training.json", "evaluation.json", "training_curve.png"):
        assert (DEMO_DIR / name).is_file(), name


def test_demo_model_was_trained_before_the_holdout_on_the_recorded_data():
    record = json.loads((DEMO_DIR / "training.json").read_text())
    training, _ = split_data()
    assert training["timestamp"].max() < HOLDOUT_START
    assert record["data_digest"] == data_digest(training)
    assert record["holdout_start"] == str(HOLDOUT_START.date())
    evaluation = json.loads((DEMO_DIR / "evaluation.json").read_text())
    assert evaluation["holdout"].startswith(str(HOLDOUT_START.date()))
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert f"{evaluation['metrics']['pooled']['model']['mase']:.3f}" in card


def test_demo_forecast_on_held_out_candles():
    _, candles = split_data()
    history = candles[(candles["series_id"] == "SP500") & (candles["timestamp"] >= HOLDOUT_START)].head(128)
    tokenizer_dir, model_dir = demo_checkpoints()
    forecaster = KronosForecaster.from_pretrained(tokenizer_dir, model_dir, DEMO_MAX_CONTEXT, device="cpu")
    raw = forecaster.predict(history, pred_len=5, sample_count=4, seed=1)
    fixed = forecaster.predict(history, pred_len=5, sample_count=4, seed=1, repair_candles=True)
    prices = raw[["open", "high", "low", "close"]].to_numpy()
    assert np.isfinite(prices).all()
    last = history["close"].iloc[-1]
    assert (np.abs(prices / last - 1) < 0.5).all(), "a trained model stays near the last price"
    assert (fixed["high"] >= fixed[["open", "close"]].max(axis=1)).all()
    assert (fixed["low"] <= fixed[["open", "close"]].min(axis=1)).all()
    assert np.allclose(raw["close"], fixed["close"])
