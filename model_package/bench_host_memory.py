"""Host memory reuse (model_package/kronos/host_memory.py): engine steps with glibc's default
thresholds against the engine's own, in two child processes started one after the other.

    python -m model_package.bench_host_memory                  # 64 fitting series, then 16 sliding
    python -m model_package.bench_host_memory --cases 16x600 --steps 10

A case NxL is N one-path series of L candles, greedy, window 512 (L > 512: every step
recomputes the N windows in full, exact mode). Each child builds random Kronos-small
weights, adds the series, takes two untimed steps, then times `--steps` steps and counts
the minor page faults and the system CPU time they took. Prints one line per case and
setting, the speed-up, and a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .kronos.host_memory import without_operator_choice

# One child: argv = cases, steps, threads, "default" | "reuse".
_CHILD = """
import json, resource, sys, time, torch
import model_package.kronos.engine as engine_module
from model_package.bench import build_models, make_series
cases, steps, threads, setting = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if setting == "default":  # leave glibc's thresholds as they are
    engine_module.reuse_freed_memory = lambda: False
torch.set_num_threads(threads)
tokenizer, model = build_models(torch.device("cpu"))
tokenizer.eval(), model.eval()
results = {}
for case in cases:
    n, length = (int(v) for v in case.split("x"))
    engine = engine_module.Engine(tokenizer, model, 512)
    engine.add([make_series(length, steps + 3, i, top_k=1, top_p=1.0) for i in range(n)])
    engine.step(), engine.step()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    while not engine.idle:
        engine.step()
    results[case] = {
        "step_ms": 1e3 * seconds / steps,
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / steps,
    }
print(json.dumps(results))
"""


def run_child(cases: list[str], steps: int, threads: int, setting: str) -> dict:
    """The child's results by case."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(cases), str(steps), str(threads), setting],
        env=without_operator_choice(dict(os.environ)),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["64x392", "16x600"], help="NxL: N series of L candles")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    runs = {setting: run_child(args.cases, args.steps, args.threads, setting) for setting in ("default", "reuse")}
    summary = {}
    for case in args.cases:
        for setting, results in runs.items():
            r = results[case]
            print(
                f"{case:>8} {setting:>7}: step {r['step_ms']:8.1f} ms, {r['faults_per_step']:9.0f} minor faults "
                f"and {r['system_s_per_step']:.3f} s system time per step"
            )
        speedup = runs["default"][case]["step_ms"] / runs["reuse"][case]["step_ms"]
        print(f"{case:>8} speed-up of reuse: {speedup:.2f}x")
        summary[case] = {setting: runs[setting][case] for setting in runs} | {"speedup": round(speedup, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
