"""Give freed heap memory back to the operating system when the worker goes idle.

A generation's caches are large tensors (tens to hundreds of MiB for a full batch);
glibc keeps much of what they freed in its heap, so after a burst the process would keep
the burst's peak as resident memory. `malloc_trim(0)` returns the free pages; it costs a
few milliseconds and only runs when nothing is being generated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc); False where malloc_trim does not exist."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True
