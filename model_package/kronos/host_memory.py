"""Keep freed host memory for reuse (glibc), so that large per-step tensors cost no page faults.

With glibc's defaults, a block above the mmap threshold (at most 32 MiB, adapted at run time)
is mapped fresh on every allocation and unmapped when freed, and the top of the heap is given
back to the system. The engine allocates such blocks at every step once a pool holds many
rows or recomputes exact windows (attention scores, hidden states of [n, W, d]), so each step
had the kernel zero the same pages again: 228 000 minor page faults and 0.32 s of system
time per step for 16 sliding series of 600 candles on 2 cores, 10 % of the step
(PERFORMANCE.md, "Host memory"). `reuse_freed_memory` serves blocks below 1 GiB from the heap
and keeps the heap's top, so the next step reuses the pages: no faults at all. The process
then holds its peak heap (the row pool's budget bounds it) instead of returning it between
steps.

It is applied once per process when a CPU engine is built, only with glibc (other C
libraries have other allocators), and never over a choice the operator made: glibc's own
environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or the
`glibc.malloc.mmap_threshold` / `glibc.malloc.trim_threshold` tunables in `GLIBC_TUNABLES`)
win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

# mallopt(3) parameters and the values set.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD_BYTES = 1 << 31  # free heap top kept up to 2 GiB
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPERATOR_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def operator_chose(environ: dict[str, str] | None = None) -> bool:
    """True when the environment already sets glibc's mmap or trim threshold."""
    env = os.environ if environ is None else environ
    tunables = env.get("GLIBC_TUNABLES", "")
    return any(name in env for name in OPERATOR_VARIABLES) or any(t in tunables for t in OPERATOR_TUNABLES)


def without_operator_choice(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` without the variables `operator_chose` reads (for a child process
    that should get the engine's thresholds)."""
    return {k: v for k, v in environ.items() if k not in (*OPERATOR_VARIABLES, "GLIBC_TUNABLES")}


@cache
def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True when they were set."""
    if not sys.platform.startswith("linux") or operator_chose():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
