"""A server whose models cannot load at start-up exits with status 1.

MLServer 1.7.1 logs "Some of the models failed to load during startup!", stops and exits
with status 0, which restart policies and CI read as a clean stop. The only call of
`MLServer.stop` without a signal is that failure path, so that call marks the start as
failed and `start` then raises `SystemExit(1)`.
"""

from __future__ import annotations

from typing import Any

from mlserver.server import MLServer

STARTUP_FAILED_EXIT = 1
_PATCHED = "__kronos_patched__"


def install() -> None:
    """Patch `MLServer.start` (idempotent)."""
    if getattr(MLServer, _PATCHED, False):
        return
    original_start = MLServer.start

    async def start(self: MLServer, models_settings: Any = None) -> None:
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
