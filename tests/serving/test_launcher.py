"""`python -m serving`: host, ports and state directory from KRONOS_SERVER_* / KRONOS_STATE_DIR,
the rendered MLServer directory, one-line errors (exit 2), and one real start from another
current directory that writes nothing into the checkout's serving/ nor the current directory."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from model_package.settings import settings_variables
from serving.__main__ import bootstrap, champion_name, server_environment
from serving.launch_settings import (
    DEFAULT_STATE_DIR,
    MODELS,
    ROOT,
    SERVING,
    LaunchSettings,
    LaunchSettingsError,
    check_ports_free,
    load_launch_settings,
    write_mlserver_dir,
)
from serving.local_server import (
    LOCALHOST,
    MLSERVER_START_TIMEOUT_S,
    MODEL_NAME,
    free_ports,
    http_get,
    http_ok,
    mlserver_env,
    start_process,
    stop_process_group,
)
from serving.settings import ServingSettings, check_server_environment

LAUNCH_VARIABLES = sorted(settings_variables(LaunchSettings))


@pytest.fixture
def clean_launch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variable from the outer environment."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- settings ----------------------------------------------------------------------------------


def test_variable_names() -> None:
    assert LAUNCH_VARIABLES == [
        "KRONOS_SERVER_GRPC_PORT",
        "KRONOS_SERVER_HOST",
        "KRONOS_SERVER_HTTP_PORT",
        "KRONOS_SERVER_METRICS_PORT",
        "KRONOS_STATE_DIR",
    ]


def test_defaults_are_the_repository_settings(clean_launch_env: pytest.MonkeyPatch) -> None:
    settings = load_launch_settings()
    shipped = json.loads((SERVING / "settings.json").read_text())
    assert settings.server_host == shipped["host"] == "127.0.0.1"
    assert (settings.server_http_port, settings.server_grpc_port, settings.server_metrics_port) == (
        shipped["http_port"],
        shipped["grpc_port"],
        shipped["metrics_port"],
    )
    assert settings.state_dir == DEFAULT_STATE_DIR == ROOT / ".state"
    assert settings.default_tracking_uri == f"sqlite:///{ROOT / '.state' / 'mlflow' / 'mlflow.db'}"


def test_values_from_the_environment(clean_launch_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_launch_env.chdir(tmp_path)
    clean_launch_env.setenv("KRONOS_SERVER_HOST", "0.0.0.0")
    clean_launch_env.setenv("KRONOS_SERVER_HTTP_PORT", "9080")
    clean_launch_env.setenv("KRONOS_SERVER_GRPC_PORT", "9081")
    clean_launch_env.setenv("KRONOS_SERVER_METRICS_PORT", "")  # empty: the default
    clean_launch_env.setenv("KRONOS_STATE_DIR", "run/state")  # relative: against the current directory
    settings = load_launch_settings()
    assert (settings.server_host, settings.server_http_port, settings.server_grpc_port) == ("0.0.0.0", 9080, 9081)
    assert settings.server_metrics_port == 8082
    assert settings.state_dir == tmp_path / "run" / "state"
    assert settings.server_dir == tmp_path / "run" / "state" / "mlserver" / "9080"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRONOS_SERVER_HTTP_PORT": "0"}, "KRONOS_SERVER_HTTP_PORT: must be 1-65535, got 0"),
        ({"KRONOS_SERVER_METRICS_PORT": "65536"}, "KRONOS_SERVER_METRICS_PORT: must be 1-65535, got 65536"),
        ({"KRONOS_SERVER_GRPC_PORT": "grpc"}, "KRONOS_SERVER_GRPC_PORT: must be an integer, got grpc"),
        (
            {"KRONOS_SERVER_METRICS_PORT": "8080"},
            "KRONOS_SERVER_METRICS_PORT: must differ from KRONOS_SERVER_HTTP_PORT, both are 8080",
        ),
        (
            {"KRONOS_SERVER_HOST": "127.0.0.1 8080"},
            "KRONOS_SERVER_HOST: must be an address or host name without spaces, got '127.0.0.1 8080'",
        ),
        (
            {"KRONOS_SERVER_HTTP_PORT": "-1", "KRONOS_SERVER_GRPC_PORT": "x"},
            "KRONOS_SERVER_HTTP_PORT: must be 1-65535, got -1; KRONOS_SERVER_GRPC_PORT: must be an integer, got x",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(
    clean_launch_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        clean_launch_env.setenv(name, value)
    with pytest.raises(LaunchSettingsError) as caught:
        load_launch_settings()
    assert str(caught.value) == message


def test_a_port_in_use_is_named(clean_launch_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind((LOCALHOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        clean_launch_env.setenv("KRONOS_SERVER_GRPC_PORT", str(port))
        for name, free in zip(("KRONOS_SERVER_HTTP_PORT", "KRONOS_SERVER_METRICS_PORT"), free_ports(2), strict=True):
            clean_launch_env.setenv(name, str(free))
        with pytest.raises(LaunchSettingsError) as caught:
            check_ports_free(load_launch_settings())
    assert str(caught.value).startswith(f"KRONOS_SERVER_GRPC_PORT: cannot listen on 127.0.0.1:{port} ("), caught.value


def test_the_server_accepts_the_launcher_variables(clean_launch_env: pytest.MonkeyPatch) -> None:
    """The launcher's variables reach MLServer, whose start-up check refuses unknown names."""
    for name in LAUNCH_VARIABLES:
        clean_launch_env.setenv(name, "1")
    check_server_environment()
    clean_launch_env.setenv("KRONOS_SERVER_HTTP_PROT", "1")
    with pytest.raises(ValueError, match=r"KRONOS_SERVER_HTTP_PROT \(did you mean KRONOS_SERVER_HTTP_PORT\?\)"):
        check_server_environment()


# -- what the launcher writes and passes on ---------------------------------------------------


def test_rendered_settings_directory(tmp_path: Path) -> None:
    settings = LaunchSettings(
        server_host="0.0.0.0",
        server_http_port=9180,
        server_grpc_port=9181,
        server_metrics_port=9182,
        state_dir=tmp_path / "state",
    )
    server_dir = write_mlserver_dir(settings)
    assert server_dir == tmp_path / "state" / "mlserver" / "9180"
    rendered = json.loads((server_dir / "settings.json").read_text())
    shipped = json.loads((SERVING / "settings.json").read_text())
    changed = {"host": "0.0.0.0", "http_port": 9180, "grpc_port": 9181, "metrics_port": 9182}
    dirs = {"metrics_dir": str(server_dir / "metrics"), "environments_dir": str(server_dir / "envs")}
    assert rendered == {**shipped, **changed, **dirs}
    assert (server_dir / "models").is_symlink() and (server_dir / "models").resolve() == MODELS.resolve()
    assert (server_dir / "models" / MODEL_NAME / "model-settings.json").read_bytes() == (
        MODELS / MODEL_NAME / "model-settings.json"
    ).read_bytes()
    # a second start on the same port renders the same directory again
    assert write_mlserver_dir(settings) == server_dir
    assert sorted(p.name for p in server_dir.iterdir()) == ["metrics", "models", "settings.json"]


def test_server_environment(tmp_path: Path) -> None:
    settings = LaunchSettings(state_dir=tmp_path / "state")
    env = server_environment(settings, {"PYTHONPATH": "/elsewhere", "KRONOS_DEVICE": "cpu"})
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/elsewhere"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert env["MLSERVER_METRICS_DIR"] == str(tmp_path / "state" / "mlserver" / "8080" / "metrics")
    assert env["KRONOS_DEVICE"] == "cpu"
    # the model cache goes under the state directory once the server has that setting
    if "model_cache_dir" in ServingSettings.model_fields:
        assert env["KRONOS_MODEL_CACHE_DIR"] == str(tmp_path / "state" / "model-cache")
    else:
        assert "KRONOS_MODEL_CACHE_DIR" not in env
    kept = server_environment(
        settings, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "KRONOS_MODEL_CACHE_DIR": "/cache"}
    )
    assert kept["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert kept["KRONOS_MODEL_CACHE_DIR"] == "/cache"
    assert kept["PYTHONPATH"] == str(ROOT)


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("models:/kronos@champion", "kronos"),
        ("models:/kronos-small@champion", "kronos-small"),
        ("models:/kronos@challenger", None),
        ("models:/kronos/3", None),
        ("runs:/abc/model", None),
        ("models:/a/b@champion", None),
    ],
)
def test_champion_name(uri: str, name: str | None) -> None:
    assert champion_name(uri) == name


def test_no_champion_is_registered_for_another_uri(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = tmp_path / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{registry}", "KRONOS_MODEL_URI": "models:/kronos@challenger"}
    with caplog.at_level(logging.INFO, logger="kronos.launch"):
        bootstrap(LaunchSettings(state_dir=tmp_path / "state"), env)
    assert "KRONOS_MODEL_URI=models:/kronos@challenger is not a models:/<name>@champion URI" in caplog.text
    assert not registry.exists()  # the registry was not even opened


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRONOS_SERVER_HTTP_PORT": "0"}, "python -m serving: KRONOS_SERVER_HTTP_PORT: must be 1-65535, got 0\n"),
        ({"KRONOS_STATE_DIRR": "/tmp"}, "KRONOS_STATE_DIRR (did you mean KRONOS_STATE_DIR?)"),
    ],
)
def test_launcher_exits_2_with_one_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    child_env = mlserver_env("sqlite:///unused.db", {"KRONOS_STATE_DIR": str(tmp_path / "state"), **env})
    result = subprocess.run(
        [sys.executable, "-m", "serving"], env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "state").exists()


# -- one real start ------------------------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    """Files and folders under `root` except Python sources and bytecode caches (the code may
    change meanwhile; MLServer would write settings, metrics and environments)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts and p.suffix != ".py"}


@dataclass(frozen=True)
class Launched:
    process: subprocess.Popen
    cwd: Path
    state_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    serving_before: set[str]


@pytest.fixture(scope="module")
def launched(serving_registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """`python -m serving --no-bootstrap` run from an empty directory with a relative
    KRONOS_STATE_DIR and three free ports, serving the test registry's champion."""
    root = tmp_path_factory.mktemp("launcher")
    cwd = root / "elsewhere"
    cwd.mkdir()
    http_port, grpc_port, metrics_port = free_ports(3)
    # what a killed earlier run on this port left behind (a dead process's counter file)
    stale = root / "state" / "mlserver" / str(http_port) / "metrics" / "counter_12345.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")
    env = mlserver_env(
        serving_registry.tracking_uri,
        {
            "KRONOS_SERVER_HTTP_PORT": str(http_port),
            "KRONOS_SERVER_GRPC_PORT": str(grpc_port),
            "KRONOS_SERVER_METRICS_PORT": str(metrics_port),
            "KRONOS_STATE_DIR": "../state",
        },
    )
    env.pop("PYTHONPATH")  # the launcher puts the checkout on it
    serving_before = _tree(SERVING)
    ready_url = f"http://{LOCALHOST}:{http_port}/v2/models/{MODEL_NAME}/ready"
    process = start_process(
        [sys.executable, "-m", "serving", "--no-bootstrap"],
        root / "launcher.log",
        lambda: http_ok(ready_url),
        env=env,
        cwd=cwd,
        timeout_s=MLSERVER_START_TIMEOUT_S,
        what="python -m serving",
    )
    try:
        yield Launched(process, cwd, root / "state", http_port, grpc_port, metrics_port, serving_before)
    finally:
        stop_process_group(process)


@pytest.mark.integration
def test_serves_on_the_configured_ports(launched: Launched) -> None:
    reply = http_get(f"http://{LOCALHOST}:{launched.http_port}/v2/models/{MODEL_NAME}")
    assert reply is not None and reply[0] == 200, reply
    assert json.loads(reply[1])["name"] == MODEL_NAME
    with socket.create_connection((LOCALHOST, launched.grpc_port), timeout=10):
        pass
    metrics = http_get(f"http://{LOCALHOST}:{launched.metrics_port}/metrics", timeout_s=30)
    assert metrics is not None and metrics[0] == 200 and b"kronos_ready" in metrics[1]


@pytest.mark.integration
def test_files_land_under_the_state_dir_only(launched: Launched) -> None:
    server_dir = launched.state_dir / "mlserver" / str(launched.http_port)
    rendered = json.loads((server_dir / "settings.json").read_text())
    assert (rendered["http_port"], rendered["grpc_port"], rendered["metrics_port"]) == (
        launched.http_port,
        launched.grpc_port,
        launched.metrics_port,
    )
    assert list((server_dir / "metrics").glob("*.db")), "no Prometheus multiprocess files under the state dir"
    assert not (server_dir / "metrics" / "counter_12345.db").exists(), "an earlier run's file survived the start"
    assert not list(launched.cwd.iterdir()), "the launcher wrote into the current directory"
    assert _tree(SERVING) - launched.serving_before == set(), "the launcher wrote into serving/"
    assert not (ROOT / ".state" / "mlserver" / str(launched.http_port)).exists()
