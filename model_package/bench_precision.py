"""Reduced precision against float32: speed, token agreement and forecast error.

    python -m model_package.bench_precision                  # CPU, 2 torch threads
    python -m model_package.bench_precision --device cuda    # on a GPU
    python -m model_package.bench_precision --json out.json  # also write the results

Two parts, one process:

- speed: random weights of the Kronos-small shape (Tokenizer-base shape), one series of 392
  normalised candles -> 120 greedy steps (fits the 512 window), each precision the device
  runs against float32; median of `--repeats` runs, the precisions interleaved so that a
  busy machine slows them alike. `step ms` is (time of 120 steps - time of 1 step) / 119.
- deviation: the shipped demo model (`model_package.demo`) on real daily S&P 500 candles
  (`arch.data.sp500`), `--windows` origins spread over its held-out period 2016-2018,
  `--lookback` candles of history, `--horizon` greedy steps. Per precision against float32:
  the share of generated s1 and s2 tokens equal to float32's, the windows whose tokens all
  equal float32's, the first step (0-based) at which the others differ (median), the mean
  absolute relative difference of the forecast close, and each one's MAE of close against
  the realised closes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from .bench import build_models, make_series
from .data import load_index
from .demo import DEMO_MAX_CONTEXT, demo_checkpoints
from .forecaster import KronosForecaster, SamplingParams
from .frames import SERIES_ID, TIMESTAMP
from .kronos import generate
from .kronos.decoding import StepLinear, packed_weights
from .kronos.precision import PRECISIONS, check_precision, set_precision

MAX_CONTEXT = 512  # the Kronos-small window
HISTORY, STEPS = 392, 120
HELD_OUT = ("2016-01-01", "2018-12-31")  # never seen by the demo model's training


@dataclass
class SpeedRow:
    dtype: str
    seconds: float  # median wall time of 392 -> 120 greedy
    step_ms: float  # time of one incremental step
    speedup: float  # float32 seconds / seconds


@dataclass
class LayerRow:
    dtype: str
    rows: int  # rows (sample paths) per step
    ms: float  # median time of the packed linear layers of one step (no attention, no norms)


@dataclass
class DeviationRow:
    dtype: str
    s1_agreement: float  # share of generated s1 tokens equal to float32's
    s2_agreement: float
    identical_windows: int  # windows whose generated tokens all equal float32's
    first_divergence_median: float | None  # step (0-based) of the windows that differ; None: none differ
    close_rel_diff: float  # mean |close - close_float32| / close_float32
    close_mae: float  # mean |close - realised close|
    float32_close_mae: float


def available(device: torch.device) -> list[str]:
    """The precisions `device` runs (float32 first)."""
    ok = []
    for precision in PRECISIONS:
        with contextlib.suppress(ValueError):
            ok.append(check_precision(precision, device))
    return ok


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of fn (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(precisions: list[str], device: torch.device, repeats: int) -> list[SpeedRow]:
    """392 -> 120 greedy (and 392 -> 1) per precision on random Kronos-small weights."""
    tokenizer, base = build_models(device)
    models = {p: set_precision(copy.deepcopy(base), p) for p in precisions}
    long = [make_series(HISTORY, STEPS, 2, top_k=1, top_p=1.0)]
    short = [make_series(HISTORY, 1, 2, top_k=1, top_p=1.0)]
    times: dict[tuple[str, int], list[float]] = {}
    for model in models.values():
        generate(tokenizer, model, long, MAX_CONTEXT)  # warm-up: packs the weights
    for _ in range(max(1, repeats)):
        for p, model in models.items():  # interleaved: load on the machine hits all alike
            for series in (long, short):
                seconds = _seconds(partial(generate, tokenizer, model, series, MAX_CONTEXT), device)
                times.setdefault((p, series[0].pred_len), []).append(seconds)
    rows = []
    base_s = statistics.median(times[("float32", STEPS)])
    for p in precisions:
        t_long, t_short = statistics.median(times[(p, STEPS)]), statistics.median(times[(p, 1)])
        rows.append(SpeedRow(p, t_long, (t_long - t_short) / (STEPS - 1) * 1e3, base_s / t_long))
    return rows


def layer_times(precisions: list[str], device: torch.device, repeats: int, rows: tuple[int, ...]) -> list[LayerRow]:
    """Time of every packed linear layer of one decode step (trunk, fusion, both heads) at
    `rows` rows per step: the part of a step that the precision changes."""
    _, base = build_models(device)
    result = []
    for p in precisions:
        packed = packed_weights(set_precision(copy.deepcopy(base), p))
        dtype = next(iter(packed.blocks)).norm1.dtype
        layers = [layer for b in packed.blocks for layer in (b.qkv, b.out, b.w13, b.w2)]
        layers += [packed.fusion, packed.s1_head, packed.dep_q, packed.dep_kv, packed.dep_out, packed.s2_head]
        for n in rows:
            inputs = [torch.randn(n, 1, layer.in_features, device=device, dtype=dtype) for layer in layers]

            def steps(count: int, inputs: list[torch.Tensor] = inputs, layers: list[StepLinear] = layers) -> None:
                for _ in range(count):
                    for layer, x in zip(layers, inputs, strict=True):
                        layer(x)

            steps(3)
            times = [_seconds(partial(steps, 20), device) / 20 for _ in range(max(3, repeats))]
            result.append(LayerRow(p, n, statistics.median(times) * 1e3))
    return result


def held_out_windows(count: int, lookback: int, horizon: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(history, realised) frame pairs of the S&P 500 with origins spread over HELD_OUT."""
    frame = load_index("SP500")
    stamps = frame[TIMESTAMP]
    first = int(np.searchsorted(stamps, pd.Timestamp(HELD_OUT[0])))
    last = int(np.searchsorted(stamps, pd.Timestamp(HELD_OUT[1]), side="right")) - horizon
    origins = np.linspace(first, last, count).round().astype(int)
    return [
        (frame.iloc[o - lookback : o].reset_index(drop=True), frame.iloc[o : o + horizon].reset_index(drop=True))
        for o in origins
    ]


def deviation(
    precisions: list[str], device: torch.device, windows: int, lookback: int, horizon: int
) -> list[DeviationRow]:
    """Greedy forecasts of the demo model per precision, compared with float32's."""
    tokenizer_dir, model_dir = demo_checkpoints()
    pairs = held_out_windows(windows, lookback, horizon)
    params = SamplingParams(pred_len=horizon, top_k=1, seed=0)
    results: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray]] = {}
    realised = np.stack([r["close"].to_numpy() for _, r in pairs])  # [windows, horizon]
    for p in precisions:
        f = KronosForecaster.from_pretrained(
            tokenizer_dir, model_dir, max_context=DEMO_MAX_CONTEXT, device=device, dtype=p
        )
        s1s, s2s, closes = [], [], []
        for history, future in pairs:
            request = f.prepare(history, params, future[[SERIES_ID, TIMESTAMP]])
            outputs, _ = generate(f.tokenizer, f.model, request.inputs, f.max_context, f.mode)
            out = outputs[0]
            assert out is not None
            s1s.append(out.window_s1[0, -horizon:].cpu())
            s2s.append(out.window_s2[0, -horizon:].cpu())
            closes.append(f.finish(request, outputs).frame["close"].to_numpy())
        results[p] = (s1s, s2s, np.stack(closes))
    ref_s1, ref_s2, ref_close = results["float32"]
    rows = []
    for p in precisions:
        s1s, s2s, close = results[p]
        same = [(a == b) & (c == d) for a, b, c, d in zip(s1s, ref_s1, s2s, ref_s2, strict=True)]  # [horizon] each
        first = [int((~m).nonzero()[0, 0]) for m in same if not bool(m.all())]
        rows.append(
            DeviationRow(
                p,
                float(torch.cat([a == b for a, b in zip(s1s, ref_s1, strict=True)]).float().mean()),
                float(torch.cat([a == b for a, b in zip(s2s, ref_s2, strict=True)]).float().mean()),
                sum(bool(m.all()) for m in same),
                float(statistics.median(first)) if first else None,
                float(np.mean(np.abs(close - ref_close) / ref_close)),
                float(np.mean(np.abs(close - realised))),
                float(np.mean(np.abs(ref_close - realised))),
            )
        )
    return rows


def _step(step: float | None) -> str:
    return "-" if step is None else f"{step:g}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="runs per speed timing (median)")
    parser.add_argument("--precisions", nargs="*", help="default: every precision the device runs")
    parser.add_argument("--windows", type=int, default=24, help="held-out forecast origins")
    parser.add_argument("--lookback", type=int, default=192, help="history candles per window")
    parser.add_argument("--horizon", type=int, default=24, help="greedy steps per window")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-deviation", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or available(device)
    if "float32" not in precisions:
        precisions = ["float32", *precisions]
    for p in precisions:
        check_precision(p, device, "--precisions")
    result: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    if not args.skip_speed:
        rows = speed(precisions, device, args.repeats)
        print(f"speed: random Kronos-small weights, {HISTORY} -> {STEPS} greedy, median of {args.repeats}")
        print(f"{'dtype':<10} {'seconds':>8} {'step ms':>8} {'vs float32':>10}")
        for r in rows:
            print(f"{r.dtype:<10} {r.seconds:>8.3f} {r.step_ms:>8.2f} {r.speedup:>9.2f}x")
        result["speed"] = [asdict(r) for r in rows]
        layers = layer_times(precisions, device, args.repeats, (1, 16))
        print("\npacked linear layers of one step (trunk, fusion, heads; no attention), ms")
        print(f"{'dtype':<10} " + " ".join(f"{f'{n} rows':>8}" for n in (1, 16)))
        for p in precisions:
            print(f"{p:<10} " + " ".join(f"{r.ms:>8.2f}" for r in layers if r.dtype == p))
        result["layers"] = [asdict(r) for r in layers]
    if not args.skip_deviation:
        dev = deviation(precisions, device, args.windows, args.lookback, args.horizon)
        print(
            f"\ndeviation: demo model, S&P 500 daily, {args.windows} held-out windows "
            f"{HELD_OUT[0]}..{HELD_OUT[1]}, {args.lookback} -> {args.horizon} greedy"
        )
        print(
            f"{'dtype':<10} {'s1 agree':>8} {'s2 agree':>8} {'identical':>9} {'1st diff':>8} "
            f"{'close rel diff':>14} {'MAE':>8} {'MAE f32':>8}"
        )
        for d in dev:
            print(
                f"{d.dtype:<10} {d.s1_agreement:>8.1%} {d.s2_agreement:>8.1%} "
                f"{f'{d.identical_windows}/{args.windows}':>9} {_step(d.first_divergence_median):>8} "
                f"{d.close_rel_diff:>14.3%} {d.close_mae:>8.2f} {d.float32_close_mae:>8.2f}"
            )
        result["deviation"] = [asdict(d) for d in dev]
        result["deviation_setup"] = {
            "data": "arch.data.sp500 daily",
            "held_out": HELD_OUT,
            "windows": args.windows,
            "lookback": args.lookback,
            "horizon": args.horizon,
        }
    print("\n" + json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
