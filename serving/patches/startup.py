"""Start-up: a server whose models cannot load exits with status 1; metrics start clean.

MLServer 1.7.1 logs "Some of the models failed to load during startup!", stops and exits
with status 0, which restart policies and CI read as a clean stop. The only call of
`MLServer.stop` without a signal is that failure path, so that call marks the start as
failed and `start` then raises `SystemExit(1)`.

Metric files that earlier runs left in the metrics directory (the counters of dead workers
are kept on purpose, see `availability`) are removed before the server serves, and the
main process's metrics (`serving.server_metrics`) are created, so that they are exported
from the start.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
from mlserver.server import MLServer

from ..server_metrics import server_metrics
from .availability import remove_stale_metric_files

STARTUP_FAILED_EXIT = 1
_PATCHED = "__kronos_patched__"


def install() -> None:
    """Patch `MLServer.start` (idempotent)."""
    if getattr(MLServer, _PATCHED, False):
        return
    original_start = MLServer.start

    async def start(self: MLServer, models_settings: Any = None) -> None:
        if self._settings.parallel_workers and self._settings.metrics_dir:  # noqa: SLF001
            live = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
            remove_stale_metric_files(self._settings.metrics_dir, live)  # noqa: SLF001
            server_metrics()
        failed = False
        original_stop = self.stop

        async def stop(sig: int | None = None) -> None:
            nonlocal failed
            failed = failed or sig is None
            await original_stop(sig)

        self.stop = stop
        await original_start(self, models_settings or [])
        if failed:
            raise SystemExit(STARTUP_FAILED_EXIT)

    MLServer.start = start
    setattr(MLServer, _PATCHED, True)
