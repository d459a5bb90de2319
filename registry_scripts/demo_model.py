"""`make demo-model`: train the shipped demo Kronos from scratch and write its model card.

    python -m registry_scripts.demo_model train   # ~20 min on one CPU thread (quiet machine)
    python -m registry_scripts.demo_model card    # held-out backtest -> MODEL_CARD.md

Data: the daily S&P 500 and NASDAQ Composite candles that the `arch` package ships
(1999-2018). Everything before HOLDOUT_START trains (the last VAL_FRACTION of each series'
training part selects the best epoch); the candles from HOLDOUT_START on are never seen in
training and are where the card's backtest forecasts. Shape: presets.DEMO_*_CONFIG. Seeded;
CPU runs are deterministic for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from model_package import KronosForecaster
from model_package.data import load_indexes
from model_package.demo import DEMO_DIR, DEMO_MAX_CONTEXT, DEMO_MODEL_CONFIG, DEMO_TOKENIZER_CONFIG
from model_package.finetune import WindowSpec, finetune, from_scratch
from model_package.frames import CANDLE_COLUMNS, repair_candles
from model_package.kronos import count_parameters, save_checkpoint
from model_package.windows import data_digest

from .backtest import BacktestSpec, cut_windows, persistence_paths, score
from .evaluate import sample_candles
from .finetune import loss_curve

HOLDOUT_START = pd.Timestamp("2016-01-01")
SEED = 0
THREADS = 1  # deterministic, and robust on a busy machine (2 threads slow down a lot there)
WINDOWS = WindowSpec(lookback=64, horizon=16, val_fraction=0.15, stride=1)
# From scratch, hence larger learning rates than upstream's fine-tuning defaults.
TOKENIZER_SETTINGS = {"epochs": 6, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup": 0.05, "patience": 3}
PREDICTOR_SETTINGS = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 6e-4,
    "schedule": "cosine",
    "warmup": 0.05,
    "patience": 3,
    "teacher_forcing": False,
}
CARD_CHUNK = 8  # windows per forecast call: part of what the card's seeded samples depend on
CARD_SPEC = BacktestSpec(windows=70, context=128, horizon=10, step=10, samples=16, seed=0, band=(0.1, 0.9))
TRAINING_FILE = "training.json"
CURVE_FILE = "training_curve.png"
CARD_FILE = "MODEL_CARD.md"
EVALUATION_FILE = "evaluation.json"


def split_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training candles before HOLDOUT_START, all candles) of both indexes."""
    candles = load_indexes()
    return candles[candles["timestamp"] < HOLDOUT_START].reset_index(drop=True), candles


def train(out: Path = DEMO_DIR) -> dict:
    """Train both stages from scratch; write the checkpoints, training.json and the curve."""
    torch.set_num_threads(THREADS)
    history, _ = split_data()
    tokenizer, model = from_scratch(DEMO_TOKENIZER_CONFIG, DEMO_MODEL_CONFIG, SEED)
    began = time.time()
    stages: dict[str, dict] = {}
    for stage, settings in (("tokenizer", TOKENIZER_SETTINGS), ("predictor", PREDICTOR_SETTINGS)):
        print(f"demo-model: training the {stage}", file=sys.stderr, flush=True)
        result = finetune(
            tokenizer,
            model,
            history,
            stage,
            WINDOWS,
            {**settings, "seed": SEED},
            on_epoch=_report_epoch,
            progress=sys.stderr.isatty(),
        )
        tokenizer, model = result.tokenizer, result.model
        trained = result.stages[stage]
        stages[stage] = {"settings": settings, **asdict(trained)}
        print(
            f"demo-model: {stage} best validation loss {trained.best_loss:.4f} at epoch {trained.best_epoch + 1} "
            f"of {trained.epochs_run}",
            file=sys.stderr,
            flush=True,
        )
    save_checkpoint(tokenizer, out / "tokenizer")
    save_checkpoint(model, out / "model")
    record = {
        "data": "arch:SP500 + arch:NASDAQ daily candles",
        "training_period": f"{history['timestamp'].min().date()} .. {history['timestamp'].max().date()}",
        "holdout_start": str(HOLDOUT_START.date()),
        "data_digest": data_digest(history),
        "windows": asdict(WINDOWS),
        "windows_summary": result.split.describe(),
        "seed": SEED,
        "threads": THREADS,
        "minutes": round((time.time() - began) / 60, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tokenizer_parameters": count_parameters(tokenizer),
        "model_parameters": count_parameters(model),
        "max_context": DEMO_MAX_CONTEXT,
        "stages": stages,
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    training_curve(record).savefig(out / CURVE_FILE, dpi=80, bbox_inches="tight")
    print(f"demo-model: wrote {out} in {record['minutes']} min", file=sys.stderr)
    return record


def _report_epoch(stage: str, epoch: int, train_loss: float, val_loss: float | None) -> None:
    print(f"demo-model: {stage} epoch {epoch + 1}: train {train_loss:.4f} validation {val_loss:.4f}", file=sys.stderr)


def training_curve(record: dict) -> Figure:
    """The loss-curve figure of `kronos-registry finetune`, from the stages in training.json."""
    curves = {
        stage: {
            "train_loss": list(enumerate(data["train_loss"], start=1)),  # optimizer steps count from 1
            "epoch_train_loss": list(enumerate(data["epoch_train_loss"])),  # epochs from 0
            "val_loss": list(enumerate(data["val_loss"])),
        }
        for stage, data in record["stages"].items()
    }
    return loss_curve(curves, f"kronos-demo from scratch on {record['data']}")


# -- the model card ----------------------------------------------------------------------------


def sanity(candles: np.ndarray) -> dict[str, float]:
    """Shares of forecast candles [..., 6] that are well-formed bars."""
    open_, high, low, close, volume = (candles[..., i] for i in range(5))
    high_ok = high >= np.maximum(open_, close)
    low_ok = np.minimum(open_, close) >= low
    volume_ok = volume >= 0
    return {
        "high_ge_max_open_close": float(high_ok.mean()),
        "low_le_min_open_close": float(low_ok.mean()),
        "volume_ge_0": float(volume_ok.mean()),
        "all_three": float((high_ok & low_ok & volume_ok).mean()),
    }


def evaluate(directory: Path = DEMO_DIR) -> dict:
    """Backtest on the held-out period: the demo model vs persistence, per index and pooled."""
    torch.set_num_threads(THREADS)
    _, candles = split_data()
    forecaster = KronosForecaster.from_pretrained(
        directory / "tokenizer", directory / "model", DEMO_MAX_CONTEXT, device="cpu"
    )
    windows = [w for w in cut_windows(candles, CARD_SPEC) if w.actual["timestamp"].iloc[0] >= HOLDOUT_START]
    paths = sample_candles(forecaster, windows, CARD_SPEC, chunk_size=CARD_CHUNK)  # [W, S, H, 6]
    closes = paths[..., CANDLE_COLUMNS.index("close")]  # [W, S, H]
    results: dict[str, dict] = {}
    groups = {"pooled": list(range(len(windows)))}
    for series in sorted({w.series_id for w in windows}):
        groups[series] = [i for i, w in enumerate(windows) if w.series_id == series]
    for name, index in groups.items():
        chosen = [windows[i] for i in index]
        baseline = persistence_paths(chosen)
        base_metrics = score(baseline, chosen, CARD_SPEC.band, None)
        results[name] = {
            "windows": len(chosen),
            "model": score(closes[index], chosen, CARD_SPEC.band, base_metrics["mae"]),
            "persistence": {**base_metrics, "mase": 1.0},
        }
    mean_candles = paths.mean(axis=1)  # [W, H, 6]: what the API returns
    report = {
        "spec": CARD_SPEC.describe(),
        "holdout": f"{HOLDOUT_START.date()} .. {candles['timestamp'].max().date()}",
        "forecast_windows": len(windows),
        "metrics": results,
        "sanity_mean_forecast": sanity(mean_candles),
        "sanity_sample_paths": sanity(paths),
        "sanity_repaired_mean_forecast": sanity(repair_candles(paths).mean(axis=1)),
    }
    (directory / EVALUATION_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _metric_rows(report: dict) -> str:
    lines = [
        "| data | windows | forecaster | MASE | MAE | CRPS | 10-90 % band coverage | directional accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, block in report["metrics"].items():
        for who in ("model", "persistence"):
            m = block[who]
            crps = f"{m['crps']:.2f}" if "crps" in m else "-"
            coverage = f"{m['coverage']:.1%}" if "coverage" in m else "-"
            direction = f"{m['direction_acc']:.1%}" if "direction_acc" in m else "- (never moves)"
            lines.append(
                f"| {name} | {block['windows']} | {'kronos-demo' if who == 'model' else 'persistence'} | "
                f"{m['mase']:.3f} | {m['mae']:.2f} | {crps} | {coverage} | {direction} |"
            )
    return "\n".join(lines)


def write_card(directory: Path = DEMO_DIR) -> Path:
    """MODEL_CARD.md from training.json and a fresh held-out evaluation."""
    record = json.loads((directory / TRAINING_FILE).read_text())
    report = evaluate(directory)
    sizes = {p.parent.name: p.stat().st_size for p in directory.glob("*/model.safetensors")}
    pooled = report["metrics"]["pooled"]["model"]
    verdict = "beats" if pooled["mase"] < 1 else "does not beat"
    s_mean, s_paths = report["sanity_mean_forecast"], report["sanity_sample_paths"]
    s_fixed = report["sanity_repaired_mean_forecast"]
    stages = record["stages"]
    text = f"""# kronos-demo: a small Kronos trained from scratch on two daily indexes

The model that this project ships for offline use (`make serve`, `kronos-registry log --demo`,
the compose `register` job, load tests). It exists so that the registry loop, the server and
the load tests run on a model whose forecasts are real forecasts rather than noise. It is
**not** a substitute for the published Kronos checkpoints (pre-trained on billions of candles
from 45 exchanges); it has seen two daily series.

Reproduce everything on this page: `make demo-model` (trains, then writes this card) or
`python -m registry_scripts.demo_model card` (re-evaluates the committed weights).

## Data and split
- Daily OHLCV bars of the S&P 500 and the NASDAQ Composite, as shipped by the `arch` Python
  package (`arch.data.sp500`, `arch.data.nasdaq`; NCSA licence). `amount` is derived as
  volume x mean price, as at inference.
- Training period: {record["training_period"]} (data digest `{record["data_digest"]}`);
  within it, the last {WINDOWS.val_fraction:.0%} of each series is validation (selects the
  best epoch, early stopping). Held out for the backtest below: {report["holdout"]}, never
  seen in training.
- Windows: {record["windows_summary"]}; each normalised with its lookback part's mean and
  std, clipped at 5 (as inference normalises).

## Shape
- Tokenizer: d_model {DEMO_TOKENIZER_CONFIG.d_model}, {DEMO_TOKENIZER_CONFIG.n_enc_layers - 1}+\
{DEMO_TOKENIZER_CONFIG.n_dec_layers - 1} blocks, s1/s2 bits {DEMO_TOKENIZER_CONFIG.s1_bits}/\
{DEMO_TOKENIZER_CONFIG.s2_bits}: {record["tokenizer_parameters"]:,} parameters.
- Predictor: d_model {DEMO_MODEL_CONFIG.d_model}, {DEMO_MODEL_CONFIG.n_layers} layers, \
{DEMO_MODEL_CONFIG.n_heads} heads, ff {DEMO_MODEL_CONFIG.ff_dim}: {record["model_parameters"]:,} parameters;
  context {record["max_context"]}.
- Safetensors: tokenizer {sizes.get("tokenizer", 0) / 1e6:.2f} MB, predictor {sizes.get("model", 0) / 1e6:.2f} MB.

## Training
- From random weights (seed {record["seed"]}), {record["threads"]} CPU thread(s), torch {record["torch"]}:
  {record["minutes"]} minutes in all, on a shared 2-core machine that other jobs kept busy.
- Tokenizer: AdamW, lr {stages["tokenizer"]["settings"]["lr"]}, cosine after warm-up, batch \
{stages["tokenizer"]["settings"]["batch_size"]}; {stages["tokenizer"]["epochs_run"]} epochs, best validation \
reconstruction MSE {stages["tokenizer"]["best_loss"]:.4f} (epoch {stages["tokenizer"]["best_epoch"] + 1}).
- Predictor: AdamW, lr {stages["predictor"]["settings"]["lr"]}, cosine after warm-up, batch \
{stages["predictor"]["settings"]["batch_size"]}, s2 head conditioned on sampled s1 (upstream's recipe); \
{stages["predictor"]["epochs_run"]} epochs, best validation loss {stages["predictor"]["best_loss"]:.4f} \
(mean cross-entropy of the two sub-tokens, epoch {stages["predictor"]["best_epoch"] + 1}).

![training curve]({CURVE_FILE})

## Held-out backtest (close), against persistence
Rolling origins every {CARD_SPEC.horizon} trading days through the held-out period, \
{CARD_SPEC.context} candles of context, {CARD_SPEC.horizon}-day horizon, {CARD_SPEC.samples} sample paths \
(seed {CARD_SPEC.seed}), default sampling (temperature 1, top_p 1). MASE < 1 beats persistence (the last \
close repeated); CRPS is on the sample paths; coverage is the share of actual closes inside the 10-90 % band.

{_metric_rows(report)}

Honest reading: pooled over both indexes the demo model **{verdict}** persistence on MASE \
({pooled["mase"]:.3f}). Daily index closes are close to a random walk, and persistence is hard to beat at \
these horizons.

## Are the forecast candles well-formed?
Over every forecast candle of the backtest. The first two columns are the raw model (no
post-processing); the last is the optional post-processing `repair_candles=true`:

| check | raw mean forecast (what the API returns) | raw sample paths | mean forecast, `repair_candles=true` |
|---|---|---|---|
| high >= max(open, close) | {s_mean["high_ge_max_open_close"]:.1%} | {s_paths["high_ge_max_open_close"]:.1%} | \
{s_fixed["high_ge_max_open_close"]:.1%} |
| min(open, close) >= low | {s_mean["low_le_min_open_close"]:.1%} | {s_paths["low_le_min_open_close"]:.1%} | \
{s_fixed["low_le_min_open_close"]:.1%} |
| volume >= 0 | {s_mean["volume_ge_0"]:.1%} | {s_paths["volume_ge_0"]:.1%} | {s_fixed["volume_ge_0"]:.1%} |
| all three | {s_mean["all_three"]:.1%} | {s_paths["all_three"]:.1%} | {s_fixed["all_three"]:.1%} |

The raw model does **not** reach 99 %. The cause is the tokenizer: a window is normalised
with the std of its price level (a few per cent of the price over 64 days), while a daily
bar's high-low range is a fraction of that, and the reconstruction error of this small
tokenizer (validation MSE {stages["tokenizer"]["best_loss"]:.3f} in normalised units) is of the same size. The
documented, optional remedy is the param `repair_candles=true` (pyfunc, V2 and
`KronosForecaster.predict`): every sampled path gets high raised to max(open, close), low
lowered to min(open, close) and negative volume/amount set to 0, before the mean and the
quantiles. It never moves open or close, so the close metrics above do not change.

## Intended use and limits
Demonstrations, tests of the serving stack and of the registry loop, load tests. Not for trading. Trained
on two US equity indexes at daily resolution only; intraday or other markets are out of distribution.
"""
    path = directory / CARD_FILE
    path.write_text(text)
    print(f"demo-model: wrote {path}", file=sys.stderr)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry_scripts.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "card", "all"))
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="where weights and card go")
    args = parser.parse_args(argv)
    if args.command in ("train", "all"):
        train(args.out)
    if args.command in ("card", "all"):
        write_card(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
