"""Exit codes of `kronos-registry` and the one error type that carries them.

Scripts can rely on these codes:

    0  ok
    1  unexpected error (a bug: rerun with KRONOS_REGISTRY_DEBUG=1 for the traceback)
    2  usage error (bad arguments)
    3  promotion gate refused
    4  registry unreachable
    5  not found: unknown registered model, alias or version, no earlier champion to roll
       back to, or a checkpoint (hub id or directory) that cannot be resolved
    6  bad data (a file missing, unreadable or not in the long candle format; for finetune
       also data too short for one training window, or fewer windows than a batch)
    7  not authenticated: the registry answered 401 (no or wrong MLFLOW_TRACKING_USERNAME /
       MLFLOW_TRACKING_PASSWORD), or MLFLOW_TRACKING_*_FILE names an unreadable file
    8  permission denied: the registry answered 403 (e.g. promote / rollback without MANAGE
       on the registered model; see docs/registry-auth.md)
  130  interrupted (Ctrl-C / SIGTERM); `finetune` saved its state: rerun with --resume
"""

from __future__ import annotations

OK = 0
UNEXPECTED = 1
USAGE = 2
GATE_REFUSED = 3
UNREACHABLE = 4
NOT_FOUND = 5
BAD_DATA = 6
UNAUTHENTICATED = 7
PERMISSION_DENIED = 8
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class CliError(Exception):
    """An expected failure: a one-line message for stderr and the exit code to return."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class GateRefusedError(CliError):
    """The promotion gate said no."""

    def __init__(self, message: str) -> None:
        super().__init__(message, GATE_REFUSED)


class NotFoundError(CliError):
    """An unknown model, alias or version."""

    def __init__(self, message: str) -> None:
        super().__init__(message, NOT_FOUND)


class BadDataError(CliError):
    """Data that cannot be used for a backtest or a fine-tune."""

    def __init__(self, message: str) -> None:
        super().__init__(message, BAD_DATA)


class UnreachableError(CliError):
    """The tracking / registry server does not answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNREACHABLE)


class InterruptedRunError(CliError):
    """A fine-tune stopped by Ctrl-C / SIGTERM: state saved, run KILLED, resumable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INTERRUPTED)
