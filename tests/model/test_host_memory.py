"""A CPU engine makes the process reuse freed host memory (glibc): large per-step tensors
then cost no page faults, unless the operator chose glibc's thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model_package.kronos.host_memory import operator_chose, without_operator_choice

ROOT = Path(__file__).resolve().parents[2]

# Builds a CPU engine, then allocates and fills a 64 MiB tensor 20 times (the pattern of an
# engine step's large activations) and prints the minor page faults that took.
_PROBE = """
import json, resource, torch
from model_package.bench import build_models
from model_package.kronos import Engine
from model_package.kronos.host_memory import reuse_freed_memory
tokenizer, model = build_models(torch.device("cpu"))
Engine(tokenizer.eval(), model.eval(), max_context=64)
torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "set": reuse_freed_memory()}))
"""


def _probe(**env: str) -> dict:
    environ = without_operator_choice(dict(os.environ))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env={**environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_engine_makes_freed_blocks_reusable_without_page_faults():
    reused = _probe()
    chosen = _probe(MALLOC_MMAP_THRESHOLD_=str(128 << 10))  # the operator's choice: glibc maps afresh
    assert reused["set"] and not chosen["set"]
    pages = 20 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # Mapped afresh, each 64 MiB block faults its pages in again (fewer with huge pages).
    assert chosen["faults"] > pages // 1000, chosen
    assert reused["faults"] * 20 < chosen["faults"], (reused, chosen)


def test_the_operators_glibc_settings_win():
    assert not operator_chose({})
    assert operator_chose({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert operator_chose({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert operator_chose({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not operator_chose({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
