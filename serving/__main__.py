"""`python -m serving` (`make serve`): register a champion if needed, then run MLServer.

    python -m serving                 # 127.0.0.1:8080/8081/8082, embedded sqlite registry under .state/mlflow
    KRONOS_SERVER_HTTP_PORT=9080 KRONOS_SERVER_GRPC_PORT=9081 KRONOS_SERVER_METRICS_PORT=9082 \\
        KRONOS_STATE_DIR=/srv/kronos python -m serving
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m serving --no-bootstrap

Environment (all optional; works from any current directory, nothing is written to serving/):

    KRONOS_SERVER_HOST          127.0.0.1   address MLServer binds (0.0.0.0: all interfaces)
    KRONOS_SERVER_HTTP_PORT     8080        V2 REST
    KRONOS_SERVER_GRPC_PORT     8081        V2 gRPC
    KRONOS_SERVER_METRICS_PORT  8082        Prometheus /metrics
    KRONOS_STATE_DIR            .state      of the checkout; relative: against the current directory
    KRONOS_MODEL_URI            models:/kronos@champion   what the server loads; a champion is
                                            registered first only for a models:/<name>@champion URI
    MLFLOW_TRACKING_URI         sqlite:///<state>/mlflow/mlflow.db

Under the state directory: mlflow/ (the embedded registry and its artifacts), model-cache/
(KRONOS_MODEL_CACHE_DIR unless set), live.db (the live-accuracy store,
KRONOS_LIVE_STORE_URI unless set) and mlserver/<http port>/ (the rendered settings.json,
a link to serving/models and the metrics files; see `serving.launch_settings`). A bad value
stops the launcher with one line naming the variable, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from .launch_settings import (
    ROOT,
    LaunchSettings,
    LaunchSettingsError,
    check_ports_free,
    load_launch_settings,
    write_mlserver_dir,
)
from .settings import ServingSettings, check_server_environment

logger = logging.getLogger("kronos.launch")

CHAMPION_URI = re.compile(r"^models:/(?P<name>[^/@]+)@champion$")
USAGE_ERROR = 2


def champion_name(model_uri: str) -> str | None:
    """The registered model name of a `models:/<name>@champion` URI; None for any other URI."""
    match = CHAMPION_URI.match(model_uri)
    return match["name"] if match else None


def model_uri(environ: Mapping[str, str]) -> str:
    """What the server will load: KRONOS_MODEL_URI, else ServingSettings' default."""
    default = str(ServingSettings.model_fields["model_uri"].default)
    return environ.get("KRONOS_MODEL_URI") or default


def server_environment(settings: LaunchSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus what MLServer needs from the launcher: the registry (default: the
    embedded one), the metrics directory, the model cache and the live store under the state
    directory (unless set) and this checkout first on PYTHONPATH."""
    env = dict(environ)
    env.setdefault("MLFLOW_TRACKING_URI", settings.default_tracking_uri)
    env["MLSERVER_METRICS_DIR"] = str(settings.metrics_dir)  # the same as settings.json's metrics_dir
    if "model_cache_dir" in ServingSettings.model_fields:  # the server refuses unknown KRONOS_* names
        env.setdefault("KRONOS_MODEL_CACHE_DIR", str(settings.model_cache_dir))
    env.setdefault("KRONOS_LIVE_STORE_URI", settings.live_store_uri)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p)
    return env


def checked_settings() -> LaunchSettings:
    """The launcher's settings, once the environment has no unknown `KRONOS_*` name, the three
    ports are free and the state directory exists. ValueError (LaunchSettingsError, or the
    unknown-variable error) with a one-line message otherwise."""
    settings = load_launch_settings()
    check_server_environment()
    check_ports_free(settings)
    try:
        settings.registry_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LaunchSettingsError(f"KRONOS_STATE_DIR: cannot create {settings.registry_dir} ({error})") from None
    return settings


def bootstrap(settings: LaunchSettings, env: Mapping[str, str]) -> None:
    """Register a champion when the server will load `models:/<name>@champion` and the
    registry has none; any other KRONOS_MODEL_URI is left alone (one INFO line)."""
    uri = model_uri(env)
    name = champion_name(uri)
    if name is None:
        logger.info("KRONOS_MODEL_URI=%s is not a models:/<name>@champion URI: no champion bootstrap", uri)
        return
    from .bootstrap import ensure_champion

    ensure_champion(env["MLFLOW_TRACKING_URI"], settings.registry_dir / "artifacts", name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--no-bootstrap", action="store_true", help="do not register a champion when the registry has none"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = checked_settings()
    except ValueError as error:
        print(f"python -m serving: {error}", file=sys.stderr)
        return USAGE_ERROR
    env = server_environment(settings, os.environ)
    if not args.no_bootstrap:
        bootstrap(settings, env)
    server_dir = write_mlserver_dir(settings)
    logger.info(
        "MLServer on %s: REST %d, gRPC %d, metrics %d (%s)",
        settings.server_host,
        settings.server_http_port,
        settings.server_grpc_port,
        settings.server_metrics_port,
        server_dir / "settings.json",
    )
    mlserver = Path(sys.executable).with_name("mlserver")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(mlserver), [str(mlserver), "start", str(server_dir)], env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main())
