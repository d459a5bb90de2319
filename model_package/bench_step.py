"""Step-time profile of the generation engine against the memory-bandwidth floor.

    python -m model_package.bench_step                      # CPU, 2 threads, Kronos-small shape
    python -m model_package.bench_step --device cuda        # on a GPU
    python -m model_package.bench_step --rows 1 16 64       # rows in the pool

A decode step multiplies every row's newest position by every weight matrix of the
trunk and both heads, so at small row counts it must read all of those weights once: the
floor of a step is (bytes of the packed weights + bytes of the KV cache it attends over)
divided by the memory bandwidth of the device. The bandwidth is measured here, in the same
process, as the rate of a large tensor copy (read + write). For each row count the script
prints the median step time, the floor and their ratio, then the operators that take the
step's time (torch profiler, self time).

The other part of a step is operator dispatch: Python, the dispatcher and the launch of
each of a step's ~2 000 operators (views included), whatever their size. The script
measures it as the step time of a narrow model with the same operator graph (the same
layers, heads, vocabularies and history, d_model and ff_dim 64, so that its products and
attention read almost nothing): "dispatch". At one row that is all it is; with many rows
it also holds the work that grows with the rows but not with the width (the fused
attention's set-up per row and head, sampling over the vocabularies). A step cannot be
faster than the larger of its floor and its dispatch time, and is about their sum on CPU,
where nothing overlaps.

Random weights of the Kronos-small shape (speed does not depend on the values); each row
is its own series with a 392-candle history (the window is 512), greedy. `--dtype` runs the
engine in a reduced precision (`precision.set_precision`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from .bench import build_models, make_series
from .kronos import PRESETS, Engine, Kronos
from .kronos.checkpoint import random_init_
from .kronos.decoding import Dense, OutputMajorDense, packed_weights
from .kronos.precision import PRECISIONS, set_precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read once and written once)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - started)
    return 2 * src.numel() * 4 / statistics.median(times)


def weight_bytes(model: Kronos) -> int:
    """Bytes a step reads from the packed weights (one layout of each matrix, at the
    model's precision: float32 or half values, or int8 values with a scale per output)."""
    packed = packed_weights(model)
    layers = [d for blk in packed.blocks for d in (blk.qkv, blk.out, blk.w13, blk.w2)]
    layers += [packed.fusion, packed.s1_head, packed.s2_head, packed.dep_q, packed.dep_kv, packed.dep_out]
    total = 0
    for dense in layers:
        if isinstance(dense, Dense):
            total += dense.input_major.numel() * dense.input_major.element_size()
        elif isinstance(dense, OutputMajorDense):
            total += dense.weight.numel() * dense.weight.element_size()
        else:  # int8 values and one float32 scale per output
            total += dense.in_features * dense.out_features + 4 * dense.out_features
    return total


def step_times(engine: Engine, rows: int, history: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` decode steps with `rows` one-path series in the pool."""
    engine.add([make_series(history, steps + 2, data_seed=i, top_k=1, top_p=1.0) for i in range(rows)])
    engine.step()  # the first step after a join builds the lane's masks: not timed
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        engine.step()
        _sync(device)
        times.append(time.perf_counter() - started)
    while not engine.idle:
        engine.step()
    return times


def narrow_model(device: torch.device) -> Kronos:
    """Kronos-small's operator graph with d_model = ff_dim = 64 (random weights): its step
    time is the dispatch time of a Kronos-small step."""
    config = dataclasses.replace(PRESETS["NeoQuasar/Kronos-small"].model_config, d_model=64, ff_dim=64)
    return random_init_(Kronos(config), torch.Generator().manual_seed(1)).to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m model_package.bench_step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--history", type=int, default=392)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=8, help="operators listed per profile")
    parser.add_argument("--dtype", default="float32", choices=PRECISIONS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer, model = build_models(device)
    tokenizer.eval(), model.eval()
    narrow = narrow_model(device)
    set_precision(model, args.dtype), set_precision(narrow, args.dtype)
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes(model)
    print(f"device {device}, {args.threads} threads, {args.dtype}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"packed weights {weights / 2**20:.1f} MiB")  # fmt: skip
    results = {}
    for rows in args.rows:
        engine = Engine(tokenizer, model, 512)
        times = step_times(engine, rows, args.history, args.steps, device)
        kv = sum(lane.allocated_bytes() for lane in engine.lanes.values())
        median = statistics.median(times)
        dispatch = statistics.median(step_times(Engine(tokenizer, narrow, 512), rows, args.history, args.steps, device))
        engine = Engine(tokenizer, model, 512)
        engine.add([make_series(args.history, 8, data_seed=i, top_k=1, top_p=1.0) for i in range(rows)])
        engine.step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(4):
                engine.step()
            _sync(device)
        kv = max(kv, sum(lane.allocated_bytes() for lane in engine.lanes.values()))
        floor = (weights + kv) / bandwidth
        results[rows] = {"step_ms": round(1e3 * median, 3), "floor_ms": round(1e3 * floor, 3),
                         "ratio": round(median / floor, 2), "dispatch_ms": round(1e3 * dispatch, 3)}  # fmt: skip
        print(f"\n{rows} rows: step {1e3 * median:.2f} ms (median of {len(times)}), floor {1e3 * floor:.2f} ms "
              f"(weights + {kv / 2**20:.0f} MiB of KV), {median / floor:.1f}x the floor; "
              f"dispatch {1e3 * dispatch:.2f} ms, floor + dispatch {1e3 * (floor + dispatch):.2f} ms")  # fmt: skip
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
