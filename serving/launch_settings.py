"""Settings of the launcher `python -m serving` (`make serve`), read from `KRONOS_*` variables.

`LaunchSettings` says where MLServer listens and where the launcher keeps its state; from it
`write_mlserver_dir` renders the directory `mlserver start` runs from:

    <state>/mlserver/<http port>/settings.json   serving/settings.json, host/ports/metrics_dir replaced
    <state>/mlserver/<http port>/models          symlink to the checkout's serving/models
    <state>/mlserver/<http port>/metrics/        Prometheus multiprocess files (cleared at start)
    <state>/mlserver/<http port>/envs/           MLServer's environments_dir (default: ./.envs)

One directory per HTTP port, so servers on other ports can share a state directory without
mixing their metrics. A symlink, not `model_repository_root`: `mlserver start FOLDER`
overwrites that setting with FOLDER.

The container image does not use this launcher (it runs `mlserver start /app/serving`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.settings import ENV_PREFIX

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
MODELS = SERVING / "models"
DEFAULT_STATE_DIR = ROOT / ".state"


class LaunchSettingsError(ValueError):
    """A launcher variable has a value the launcher cannot use; the message is one line that
    names the variable, the rule and the value."""


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


Port = Annotated[int, AfterValidator(_port)]
PORT_FIELDS = ("server_http_port", "server_grpc_port", "server_metrics_port")


def variable(field: str) -> str:
    """The environment variable of a `LaunchSettings` field (`KRONOS_SERVER_HTTP_PORT`)."""
    return f"{ENV_PREFIX}{field}".upper()


class LaunchSettings(BaseSettings):
    """Where MLServer listens and where the launcher keeps its files (prefix `KRONOS_`; an
    empty variable means the default)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    server_host: str = Field("127.0.0.1", description="address MLServer's three servers bind (0.0.0.0: all)")
    server_http_port: Port = Field(8080, description="V2 REST port")
    server_grpc_port: Port = Field(8081, description="V2 gRPC port")
    server_metrics_port: Port = Field(8082, description="Prometheus /metrics port")
    state_dir: Path = Field(
        DEFAULT_STATE_DIR,
        description="embedded registry (mlflow/), MLServer settings and metrics (mlserver/), model cache "
        "(model-cache/); relative: against the current directory",
    )

    @field_validator("server_host")
    @classmethod
    def _host(cls, host: str) -> str:
        if not host.strip() or any(char.isspace() for char in host):
            raise ValueError("must be an address or host name without spaces")
        return host

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return Path.cwd() / path.expanduser()  # an absolute path stays as it is

    @model_validator(mode="after")
    def _distinct_ports(self) -> LaunchSettings:
        seen: dict[int, str] = {}
        for field in PORT_FIELDS:
            port = getattr(self, field)
            if port in seen:
                raise ValueError(f"{variable(field)}: must differ from {variable(seen[port])}, both are {port}")
            seen[port] = field
        return self

    @property
    def server_dir(self) -> Path:
        """The directory `mlserver start` runs from (one per HTTP port)."""
        return self.state_dir / "mlserver" / str(self.server_http_port)

    @property
    def metrics_dir(self) -> Path:
        """MLServer's Prometheus multiprocess directory."""
        return self.server_dir / "metrics"

    @property
    def environments_dir(self) -> Path:
        """MLServer's `environments_dir`, which it creates at start (default: `.envs` of the
        current directory)."""
        return self.server_dir / "envs"

    @property
    def registry_dir(self) -> Path:
        """The embedded sqlite registry (`mlflow.db`) and its artifacts (`artifacts/`)."""
        return self.state_dir / "mlflow"

    @property
    def default_tracking_uri(self) -> str:
        """The embedded registry, used when MLFLOW_TRACKING_URI is not set."""
        return f"sqlite:///{self.registry_dir / 'mlflow.db'}"

    @property
    def model_cache_dir(self) -> Path:
        """Where the server keeps downloaded model versions (KRONOS_MODEL_CACHE_DIR default)."""
        return self.state_dir / "model-cache"

    @property
    def live_store_uri(self) -> str:
        """The live-accuracy store (KRONOS_LIVE_STORE_URI default): `live.db` in the state directory."""
        return f"sqlite:///{self.state_dir.resolve() / 'live.db'}"

    def mlserver_settings(self) -> dict[str, Any]:
        """serving/settings.json with this host, these ports, `metrics_dir` and `environments_dir`."""
        settings: dict[str, Any] = json.loads((SERVING / "settings.json").read_text())
        settings.update(
            host=self.server_host,
            http_port=self.server_http_port,
            grpc_port=self.server_grpc_port,
            metrics_port=self.server_metrics_port,
            metrics_dir=str(self.metrics_dir),
            environments_dir=str(self.environments_dir),
        )
        return settings


def _shown(value: object) -> str:
    """`value` as typed (`0`, `abc`); quoted when empty or holding spaces or quotes."""
    text = str(value)
    return text if re.fullmatch(r"[^\s'\"]+", text) else repr(text)


def one_line(error: ValidationError) -> str:
    """`VARIABLE: rule, got value` for every error of `error`, joined with '; '."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule over several fields names them itself
            parts.append(message)
            continue
        name = variable("_".join(str(part) for part in item["loc"]))
        if item["type"] == "int_parsing":
            message = "must be an integer"
        parts.append(f"{name}: {message}, got {_shown(item['input'])}")
    return "; ".join(parts)


def load_launch_settings() -> LaunchSettings:
    """`LaunchSettings` from the environment; LaunchSettingsError (one line) when a value is bad."""
    try:
        return LaunchSettings()
    except ValidationError as error:
        raise LaunchSettingsError(one_line(error)) from None


def check_ports_free(settings: LaunchSettings) -> None:
    """LaunchSettingsError when one of the three ports cannot be bound on the host right now
    (another server holds it, or the host is not an address of this machine): MLServer would
    only find out after loading the model."""
    for field in PORT_FIELDS:
        port = getattr(settings, field)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                settings.server_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as error:
            raise LaunchSettingsError(
                f"{variable('server_host')}: cannot resolve {settings.server_host!r} ({error.strerror})"
            ) from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as error:
                culprit = "server_host" if error.errno == errno.EADDRNOTAVAIL else field
                raise LaunchSettingsError(
                    f"{variable(culprit)}: cannot listen on {settings.server_host}:{port} ({error.strerror})"
                ) from None


def write_mlserver_dir(settings: LaunchSettings) -> Path:
    """Render `settings.server_dir` (see the module docstring) and return it. Metrics files
    an earlier run left there are removed when the server starts (`serving.patches.startup`,
    for every way MLServer is started)."""
    server_dir = settings.server_dir
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    models = server_dir / "models"
    if not (models.is_symlink() and models.resolve() == MODELS.resolve()):
        staged = server_dir / f".models.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        staged.symlink_to(MODELS, target_is_directory=True)
        os.replace(staged, models)
    staged = server_dir / f".settings.json.{os.getpid()}"
    staged.write_text(json.dumps(settings.mlserver_settings(), indent=2) + "\n")
    os.replace(staged, server_dir / "settings.json")
    return server_dir
