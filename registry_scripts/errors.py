"""Exit codes of `kronos-registry` and the one error type that carries them.

Scripts can rely on these codes:

    0  ok
    1  unexpected error (a bug: rerun with KRONOS_REGISTRY_DEBUG=1 for the traceback)
    2  usage error (bad arguments)
    3  promotion gate refused
    4  registry unreachable
    5  not found: unknown registered model, alias or version, no earlier champion to roll
       back to, or a checkpoint (hub id or directory) that cannot be resolved
    6  bad data file (missing, unreadable, or not the long candle format)
"""

from __future__ import annotations

OK = 0
UNEXPECTED = 1
USAGE = 2
GATE_REFUSED = 3
UNREACHABLE = 4
NOT_FOUND = 5
BAD_DATA = 6


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
    """A data file that cannot be used for a backtest."""

    def __init__(self, message: str) -> None:
        super().__init__(message, BAD_DATA)


class UnreachableError(CliError):
    """The tracking / registry server does not answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNREACHABLE)
