"""Helpers of the end-to-end tests: the running stack, and the serving tests' helpers.

`tests/serving/serving_helpers.py` (candle frames, V2 bodies, `start_server`) is made
importable as `serving_helpers` here, also when only tests/integration is collected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

SERVING_TESTS = Path(__file__).resolve().parents[1] / "serving"
if str(SERVING_TESTS) not in sys.path:
    sys.path.append(str(SERVING_TESTS))

from serving_helpers import Server  # noqa: E402

from serving.gateway.process import GatewayProcess  # noqa: E402

CLIENT = "127.0.0.1"  # allowed, not admin
ADMIN = "127.0.0.3"  # allowed and admin


@dataclass
class Stack:
    """MLServer and the nginx gateway in front of it."""

    server: Server
    gateway: GatewayProcess

    def server_log(self) -> str:
        """Everything the MLServer process (and its inference worker) wrote so far."""
        return self.server.log.read_text(errors="replace")
