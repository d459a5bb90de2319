"""Benchmark of the generators: upstream-style reference loop vs our fast generator.

    python -m model_package.bench                 # all cases, CPU, 2 torch threads
    python -m model_package.bench --cases 1 2     # a subset
    python -m model_package.bench --device cuda   # on a GPU
    python -m model_package.bench --memory        # measured peak memory vs the cost bound

Random weights of the Kronos-small shape with the Tokenizer-base shape (no hub access
needed; speed does not depend on the weight values). The shipped trained demo model
(`model_package.demo`) is deliberately not used: it is much smaller than the published
shapes whose speed this measures, and nothing here looks at forecast quality. Every timing is the median of
`--repeats` runs; ratios are computed from medians measured in the same process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import psutil
import torch

from .kronos import PRESETS, Kronos, KronosTokenizer, SeriesInput, generate
from .kronos.checkpoint import random_init_
from .kronos.cost import NetworkShape, SeriesWork, generation_cost

MAX_CONTEXT = 512
T = TypeVar("T")


@dataclass
class Row:
    case: str
    reference_s: float
    fast_s: float
    speedup: float
    max_abs_diff: float
    peak_mem_mib: float
    kv_cache_mib: float
    note: str = ""


class PeakMemory:
    """Peak extra memory while a block runs: RSS sampled every 2 ms (CPU) or the CUDA
    allocator's high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def build_models(device: torch.device) -> tuple[KronosTokenizer, Kronos]:
    preset = PRESETS["NeoQuasar/Kronos-small"]
    g = torch.Generator().manual_seed(0)
    tokenizer = random_init_(KronosTokenizer(preset.tokenizer_config), g).to(device)
    model = random_init_(Kronos(preset.model_config), g).to(device)
    return tokenizer, model


def make_series(length: int, pred_len: int, data_seed: int, **sampling) -> SeriesInput:
    """Synthetic normalised candles with 5-minute calendar stamps."""
    g = torch.Generator().manual_seed(data_seed)
    candles = torch.randn(length, 6, generator=g).clamp(-5, 5)
    t = torch.arange(length + pred_len) * 5  # minutes
    stamps = torch.stack(
        [t % 60, (t // 60) % 24, (t // 1440) % 7, 1 + (t // 1440) % 28, 1 + (t // 40320) % 12], dim=1
    ).float()
    return SeriesInput(candles, stamps, pred_len, **sampling)


def timed(fn: Callable[[], T], repeats: int, device: torch.device) -> tuple[float, T]:
    """Median wall time over `repeats` runs (at least one), and the last result."""
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def max_diff(a: list, b: list) -> float:
    return max(float((x.paths - y.paths).abs().max()) for x, y in zip(a, b, strict=True))


def single_case(name: str, tokenizer, model, series: list[SeriesInput], args, device) -> list[Row]:
    def run(mode: str):
        return generate(tokenizer, model, series, MAX_CONTEXT, mode)

    ref_s, (ref_out, _) = timed(lambda: run("reference"), args.reference_repeats, device)
    run("fast")  # warm-up (packs weights once)
    with PeakMemory(device) as peak:
        fast_s, (fast_out, stats) = timed(lambda: run("fast"), args.repeats, device)
    rows = [
        Row(
            name,
            ref_s,
            fast_s,
            ref_s / fast_s,
            max_diff(ref_out, fast_out),
            peak.mib,
            stats.kv_cache_bytes / 2**20,
            f"{stats.incremental_steps} cached steps, {stats.full_window_passes} full-window passes",
        )
    ]
    if args.rolling:
        roll_s, (roll_out, roll_stats) = timed(lambda: run("rolling"), args.repeats, device)
        rows.append(
            Row(
                name + " [rolling, approximate]",
                ref_s,
                roll_s,
                ref_s / roll_s,
                max_diff(ref_out, roll_out),
                float("nan"),
                roll_stats.kv_cache_bytes / 2**20,
                "deviation = max |rolling - reference|",
            )
        )
    return rows


def batch_case(tokenizer, model, args, device) -> list[Row]:
    """32 series of lengths 100..500 -> 60 steps: one batched call vs one call per series.

    The four longest series slide out of the 512 window during generation; in the exact
    modes each of their sliding steps recomputes a whole window, batched or not.
    """
    lengths = [100 + round(i * 400 / 31) for i in range(32)]
    series = [make_series(n, 60, data_seed=i, top_k=1, top_p=1.0) for i, n in enumerate(lengths)]
    rows = []
    for mode in ("fast", "rolling") if args.rolling else ("fast",):
        generate(tokenizer, model, series[:2], MAX_CONTEXT, mode)  # warm-up

        def one_at_a_time(mode: str = mode) -> list:
            return [generate(tokenizer, model, [s], MAX_CONTEXT, mode)[0][0] for s in series]

        def batched(mode: str = mode) -> tuple:
            return generate(tokenizer, model, series, MAX_CONTEXT, mode)

        one_s, one_out = timed(one_at_a_time, args.repeats, device)
        with PeakMemory(device) as peak:
            batch_s, (batch_out, stats) = timed(batched, args.repeats, device)
        label = "" if mode == "fast" else " [rolling, approximate]"
        rows.append(
            Row(
                f"4: 32 series, 100..500 -> 60, greedy, one at a time vs batched{label}",
                one_s,
                batch_s,
                one_s / batch_s,
                max_diff(one_out, batch_out),
                peak.mib,
                stats.kv_cache_bytes / 2**20,
                f"reference column = {mode} mode, one series per call; speed-up = batched "
                f"throughput gain; {stats.full_window_passes} full-window passes",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", nargs="*", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast timing (median)")
    parser.add_argument(
        "--reference-repeats", type=int, default=1, help="runs per reference timing (median); the reference is slow"
    )
    parser.add_argument(
        "--no-rolling", dest="rolling", action="store_false", help="skip the approximate rolling-cache mode"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--memory", action="store_true", help="instead: peak memory of generations of many shapes vs their cost bound"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer, model = build_models(device)
    if args.memory:
        memory_check(tokenizer, model, device)
        return []
    cases = {
        1: ("1: 400 -> 120, greedy, 1 path", [make_series(400, 120, 1, top_k=1, top_p=1.0)]),
        2: ("2: 392 -> 120, greedy, 1 path (fits 512)", [make_series(392, 120, 2, top_k=1, top_p=1.0)]),
        3: (
            "3: 400 -> 120, T=1 top_p=0.9, 16 paths",
            [make_series(400, 120, 3, temperature=1.0, top_p=0.9, sample_count=16, seed=7)],
        ),
    }
    rows: list[Row] = []
    print_header()
    for number in args.cases:
        if number in cases:
            name, series = cases[number]
            new = single_case(name, tokenizer, model, series, args, device)
        else:
            new = batch_case(tokenizer, model, args, device)
        print_rows(new)
        rows += new
    print(
        f"\ndevice {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"max_context {MAX_CONTEXT}, fast timings = median of {args.repeats}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=2)
    return rows


# (series, history candles, pred_len, sample paths, mode): no window slide, single-path and
# multi-path slides, batches, the reference algorithm
MEMORY_SHAPES = [
    (1, 400, 120, 1, "fast"),
    (16, 300, 50, 1, "fast"),
    (16, 400, 120, 1, "fast"),
    (4, 520, 12, 1, "fast"),
    (2, 256, 64, 16, "fast"),
    (8, 256, 20, 16, "fast"),
    (1, 400, 120, 16, "fast"),
    (1, 500, 30, 8, "fast"),
    (1, 400, 120, 1, "rolling"),
    (1, 200, 10, 4, "reference"),
]


class HighWaterMark:
    """Exact peak RSS growth of this process while a block runs (Linux): the heap is trimmed
    and the kernel's high-water mark (VmHWM) reset first, so memory freed by an earlier
    block cannot hide this one's peak."""

    def __enter__(self) -> HighWaterMark:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.base = _status_bytes("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status_bytes("VmHWM:") - self.base

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def memory_check(tokenizer: KronosTokenizer, model: Kronos, device: torch.device) -> None:
    """Peak memory of each shape's generation next to `model_package.kronos.cost`'s bound
    (the bound holds when every ratio stays below 1): host RSS on Linux CPUs, the CUDA
    allocator's high-water mark on GPUs."""
    shape = NetworkShape.of(tokenizer.config, model.config, MAX_CONTEXT)
    generate(tokenizer, model, [make_series(64, 2, 0)], MAX_CONTEXT)  # one-time packing of weights
    print(f"{'series x candles -> pred_len, paths, mode':<44} {'bound MiB':>9} {'peak MiB':>9} {'ratio':>6}")
    worst = 0.0
    for series, length, pred_len, paths, mode in MEMORY_SHAPES:
        work = [make_series(length, pred_len, 10 + b, sample_count=paths, seed=b) for b in range(series)]
        bound = generation_cost(
            shape, [SeriesWork(length, pred_len, paths)] * series, mode, history_rows=0
        ).memory_bytes
        exact = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")
        with HighWaterMark() if exact else PeakMemory(device) as peak:
            generate(tokenizer, model, work, MAX_CONTEXT, mode)
        ratio = peak.peak / bound
        worst = max(worst, ratio)
        print(
            f"{f'{series} x {length} -> {pred_len}, {paths}, {mode}':<44} {bound / 2**20:>9.0f} "
            f"{peak.mib:>9.0f} {ratio:>6.2f}{'  OVER' if ratio > 1 else ''}",
            flush=True,
        )
    print(f"\nworst ratio {worst:.2f} (device {device}, threads {torch.get_num_threads()})")


def print_header() -> None:
    print(
        f"{'case':<62} {'reference s':>11} {'fast s':>8} {'speed-up':>8} {'max|diff|':>10} "
        f"{'peak MiB':>8} {'KV MiB':>7}  note",
        flush=True,
    )


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(
            f"{r.case:<62} {r.reference_s:>11.2f} {r.fast_s:>8.3f} {r.speedup:>7.1f}x "
            f"{r.max_abs_diff:>10.2e} {r.peak_mem_mib:>8.0f} {r.kv_cache_mib:>7.1f}  {r.note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
