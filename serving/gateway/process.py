"""Run the rendered gateway as a foreground nginx child process (local stacks and tests).

settings = GatewaySettings(http_port=18000, grpc_port=18001, status_port=18002,
                           upstream_http=["127.0.0.1:8080"],
                           upstream_grpc=["127.0.0.1:8081"])
with GatewayProcess(settings, prefix=Path("/tmp/gw")) as gateway:
    ...  # gateway.access_log, gateway.http_url
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .render import GatewaySettings, check_config, nginx_command, prepare_prefix


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until a TCP connect to host:port succeeds; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


class GatewayProcess:
    """nginx rendered from `settings` into `prefix`, validated, started and stopped."""

    def __init__(
        self, settings: GatewaySettings, prefix: Path, nginx: str | None = None, start_timeout_s: float = 10.0
    ) -> None:
        self.settings = settings
        self.prefix = prefix.resolve()
        self.nginx = nginx
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.prefix / "logs" / "nginx.stderr"

    @property
    def access_log(self) -> Path:
        """The JSON access log (absolute)."""
        return self.prefix / self.settings.access_log

    @property
    def http_url(self) -> str:
        """Base URL of the REST server, e.g. http://127.0.0.1:8000."""
        return f"http://{self._client_host()}:{self.settings.http_port}"

    @property
    def grpc_target(self) -> str:
        """host:port of the gRPC server, as grpc.insecure_channel wants it."""
        return f"{self._client_host()}:{self.settings.grpc_port}"

    def _client_host(self) -> str:
        host = self.settings.listen_host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host

    def start(self) -> GatewayProcess:
        """Render, `nginx -t`, start nginx and wait until the REST and gRPC ports listen."""
        prepare_prefix(self.settings, self.prefix)
        check_config(self.prefix, self.nginx)
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                nginx_command(self.prefix, self.nginx), stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            for port in (self.settings.http_port, self.settings.grpc_port):
                wait_for_port(self._client_host(), port, self.start_timeout_s)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.stderr_path.read_text()}") from None
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown (SIGQUIT), then SIGKILL if nginx does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
