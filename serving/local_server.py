"""Local servers for the project's tools and tests: free ports, child processes in their own
process group, `mlserver start` with serving/'s settings, and throwaway registries holding
the shipped trained demo model (`register_demo_model`, what the tools serve by default) or
random weights of a given shape (`register_random_model`: tests, and speed runs that need a
published model's shape).

    registry, tokenizer_dir, model_dir = register_demo_model(workdir)
    with LocalServer.start(workdir / "server", registry.tracking_uri,
                           env={"KRONOS_QUEUE_BUDGET_MB": "512"},
                           model_settings={"max_batch_size": 8}) as server:
        server.url, server.grpc_target, server.rss_bytes()

Every wait is bounded and gives up at once when the child exits; every child runs in its
own process group, stopped with SIGTERM and, when it lingers, SIGKILL. Only the standard
library, psutil and the model package are needed (mlflow when a registry is made), so the
pandas-3 test environment, which has no MLServer, can use the process helpers too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models.model import ModelInfo

    from model_package.forecaster import KronosForecaster
    from model_package.kronos import KronosConfig, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
MODEL_NAME = "kronos"
LOCALHOST = "127.0.0.1"
STOP_TIMEOUT_S = 20.0
MLSERVER_START_TIMEOUT_S = 300.0


# -- ports and processes ---------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on `host` that nobody listens on right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` different TCP ports on `host` that nobody listens on right now (all sockets
    are held until every port is picked: separate `free_port` calls may return one port
    twice, since a closed socket's port can be handed out again at once)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def stop_process_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a child started with `start_new_session=True` and its whole process group;
    SIGKILL the group when the child has not exited after `timeout_s` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout_s)
    except ProcessLookupError:
        pass  # the group ended between poll() and killpg()


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants; 0 when it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None when nothing answered (refused, reset, timed out)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, http.client.HTTPException):
        return None


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    """True when a GET of `url` answers 200."""
    reply = http_get(url, timeout_s)
    return reply is not None and reply[0] == 200


def log_tail(log: Path, chars: int = 4000) -> str:
    """The last `chars` characters of a log file ("" while it does not exist)."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_ready(
    process: subprocess.Popen,
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    log: Path | None = None,
    poll_s: float = 0.5,
) -> None:
    """Poll `ready()` every `poll_s` seconds for at most `timeout_s` seconds.

    RuntimeError "{what} exited with {code}" as soon as the process exits, or "{what} not
    ready after {timeout_s} s", each followed by the tail of `log`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_tail(log) if log else ''}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{log_tail(log) if log else ''}")
        time.sleep(poll_s)


def start_process(
    command: Sequence[str],
    log: Path,
    ready: Callable[[], bool],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 120.0,
    what: str | None = None,
) -> subprocess.Popen:
    """Start `command` in its own process group, stdout and stderr to `log`, and wait until
    `ready()` (see `wait_ready`); the child is stopped when it never gets ready."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(process, ready, timeout_s, what or Path(command[0]).name, log)
    except BaseException:
        stop_process_group(process)
        raise
    return process


def venv_script(name: str) -> str:
    """A console script of this interpreter's environment (`mlserver`, `mlflow`, `locust`)."""
    return str(Path(sys.executable).with_name(name))


_Process = TypeVar("_Process", bound="LocalProcess")


@dataclass
class LocalProcess:
    """A child process in its own process group, with its log file."""

    process: subprocess.Popen
    log: Path

    def tail(self, chars: int = 4000) -> str:
        """The end of what the process wrote."""
        return log_tail(self.log, chars)

    def rss_bytes(self) -> int:
        """Resident memory of the process and all its children (bytes)."""
        return process_tree_rss(self.process.pid)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        stop_process_group(self.process, timeout_s)

    def __enter__(self: _Process) -> _Process:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


# -- MLServer --------------------------------------------------------------------------------


def render_server_dir(
    workdir: Path, http_port: int, grpc_port: int, metrics_port: int, model_settings: Mapping[str, Any] | None = None
) -> None:
    """Write serving/'s settings.json (with these ports, metrics under `workdir/metrics`) and
    the model's model-settings.json (updated with `model_settings`) into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = json.loads((SERVING / "settings.json").read_text())
    settings.update(
        http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, metrics_dir=str(workdir / "metrics")
    )
    (workdir / "metrics").mkdir(exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(settings))
    model_dir = workdir / "models" / MODEL_NAME
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    spec = json.loads((SERVING / "models" / MODEL_NAME / "model-settings.json").read_text())
    spec.update(model_settings or {})
    (model_dir / "model-settings.json").write_text(json.dumps(spec))


def mlserver_env(tracking_uri: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without `KRONOS_*`, `MLSERVER*` and `PYTHON*` variables,
    plus the registry, the CPU, this checkout on PYTHONPATH and `env` (wins)."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("KRONOS_", "MLSERVER", "PYTHON"))}
    child.update({"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri})
    child.update({"KRONOS_DEVICE": "cpu", "PYTHONPATH": str(ROOT), **(env or {})})
    return child


_Server = TypeVar("_Server", bound="LocalServer")


@dataclass
class LocalServer(LocalProcess):
    """A running `mlserver start` with serving/'s settings, and its ports on 127.0.0.1."""

    http_port: int
    grpc_port: int
    metrics_port: int

    @classmethod
    def start(
        cls: type[_Server],
        workdir: Path,
        tracking_uri: str,
        env: Mapping[str, str] | None = None,
        model_settings: Mapping[str, Any] | None = None,
        timeout_s: float = MLSERVER_START_TIMEOUT_S,
    ) -> _Server:
        """Render serving/'s settings into `workdir` with three free ports, start MLServer
        there (log: `workdir/mlserver.log`) and wait until the model is ready.

        `env` adds to `mlserver_env` (the model cache defaults to `workdir/model-cache`, the
        live store to `workdir/live.db`);
        `model_settings` updates model-settings.json (e.g. `max_batch_size`). RuntimeError
        "mlserver exited with N" when the server exits first, "mlserver not ready after N s"
        when the wait runs out (it is then stopped).
        """
        http_port, grpc_port, metrics_port = free_ports(3)
        render_server_dir(workdir, http_port, grpc_port, metrics_port, model_settings)
        ready_url = f"http://{LOCALHOST}:{http_port}/v2/models/{MODEL_NAME}/ready"
        log = workdir / "mlserver.log"
        process = start_process(
            [venv_script("mlserver"), "start", str(workdir)],
            log,
            lambda: http_ok(ready_url),
            env=mlserver_env(
                tracking_uri,
                {
                    "KRONOS_MODEL_CACHE_DIR": str(workdir / "model-cache"),
                    "KRONOS_LIVE_STORE_URI": f"sqlite:///{workdir.resolve() / 'live.db'}",
                    **(env or {}),
                },
            ),
            cwd=workdir,
            timeout_s=timeout_s,
            what="mlserver",
        )
        return cls(process, log, http_port, grpc_port, metrics_port)

    @property
    def url(self) -> str:
        """Base URL of the REST server."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """host:port of the gRPC server."""
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint."""
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    def worker_pids(self) -> set[int]:
        """MLServer's inference worker processes (spawned children of the server, not
        multiprocessing's resource tracker); empty while none runs."""
        pids = set()
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if "spawn_main" in " ".join(child.cmdline()):
                        pids.add(child.pid)
        return pids

    def ready(self) -> bool:
        """`/v2/health/ready` answers 200."""
        return http_ok(f"{self.url}/v2/health/ready", timeout_s=10)

    def metrics(self) -> str:
        """The Prometheus exposition text ("" when the endpoint does not answer 200)."""
        reply = http_get(self.metrics_url, timeout_s=30)
        return reply[1].decode() if reply is not None and reply[0] == 200 else ""

    def wait_idle(self, timeout_s: float, poll_s: float = 1.0) -> bool:
        """Wait at most `timeout_s` until no request is queued or being generated
        (`/kronos/health/live`); False when the wait ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = http_get(f"{self.url}/kronos/health/live", timeout_s=10)
            if reply is not None:
                with contextlib.suppress(ValueError):
                    state = json.loads(reply[1])
                    if not state.get("running") and not state.get("queued_series"):
                        return True
            time.sleep(poll_s)
        return False


# -- model shapes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomShape:
    """The network shapes and window of a model (random weights of it, or the demo's)."""

    tokenizer: TokenizerConfig
    model: KronosConfig
    max_context: int


def random_shape(name: str) -> RandomShape:
    """`tiny` (a few thousand parameters, window 512) or a published preset's shape
    (`mini`, `small`, `base`); ValueError for anything else."""
    from model_package.kronos.presets import TINY_MODEL_CONFIG, TINY_TOKENIZER_CONFIG, preset_by_name

    if name == "tiny":
        return RandomShape(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 512)
    preset = preset_by_name(name)
    if preset is None:
        raise ValueError(f"unknown model shape {name!r} (tiny, mini, small, base)")
    return RandomShape(preset.tokenizer_config, preset.model_config, preset.max_context)


def demo_shape() -> RandomShape:
    """The shapes and window of the shipped trained demo model (`model_package.demo`)."""
    from model_package.demo import DEMO_MAX_CONTEXT, DEMO_MODEL_CONFIG, DEMO_TOKENIZER_CONFIG

    return RandomShape(DEMO_TOKENIZER_CONFIG, DEMO_MODEL_CONFIG, DEMO_MAX_CONTEXT)


def model_shape(preset: str | None) -> RandomShape:
    """The shape `register_model(workdir, preset)` serves: the demo model's for None."""
    return demo_shape() if preset is None else random_shape(preset)


def shape_forecaster(shape: RandomShape, mode: str = "fast") -> KronosForecaster:
    """A CPU forecaster of this shape with freshly initialised weights, e.g. to price
    requests with `model_package.budget.request_cost` (the cost depends on shapes only)."""
    from model_package.forecaster import KronosForecaster
    from model_package.kronos import Kronos, KronosTokenizer

    return KronosForecaster(
        KronosTokenizer(shape.tokenizer), Kronos(shape.model), shape.max_context, device="cpu", mode=mode
    )


def write_random_pair(root: Path, shape: RandomShape, seed: int = 1) -> tuple[Path, Path]:
    """(tokenizer_dir, model_dir): random weights of `shape` (seeds `seed`, `seed` + 1) in
    the Hugging Face layout under `root`."""
    from model_package.kronos import write_random_checkpoint

    return (
        write_random_checkpoint(shape.tokenizer, root / "tokenizer", seed),
        write_random_checkpoint(shape.model, root / "model", seed + 1),
    )


# -- registries --------------------------------------------------------------------------------


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's tracking and registry URIs (and MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI,
    which children inherit) at `uri`, then restore all four. A registry URI left behind by
    earlier code (`mlflow.set_registry_uri` also sets the variable) would otherwise send
    registrations to another store."""
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]  # None: unset
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]  # None: unset


@dataclass(frozen=True)
class LocalRegistry:
    """A sqlite MLflow registry in a directory, with one experiment to log into."""

    tracking_uri: str
    root: Path
    experiment_id: str

    @classmethod
    def create(cls, root: Path, experiment: str = "kronos-local") -> LocalRegistry:
        """A fresh registry `root/mlflow.db` whose artifacts live in `root/artifacts`."""
        from mlflow import MlflowClient

        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
        return cls(uri, root, str(experiment_id))

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def log_version(
        self,
        tokenizer_dir: Path | None,
        model_dir: Path,
        max_context: int | None,
        champion: bool = False,
        **log_options: Any,
    ) -> ModelInfo:
        """Log a checkpoint pair as a new version of `kronos` (in a run of the registry's
        experiment; `log_options` go to `log_kronos_model`), `champion` when asked."""
        import mlflow

        from model_package.log_model import log_kronos_model

        with tracking_uri(self.tracking_uri), mlflow.start_run(experiment_id=self.experiment_id):
            info = log_kronos_model(
                tokenizer_dir, model_dir, registered_model_name=MODEL_NAME, max_context=max_context, **log_options
            )
        if champion:
            self.set_champion(str(info.registered_model_version))
        return info

    def set_champion(self, version: str) -> None:
        self.client().set_registered_model_alias(MODEL_NAME, "champion", version)


def register_random_model(
    workdir: Path, shape: str = "small", seed: int = 1, experiment: str = "kronos-demo"
) -> tuple[LocalRegistry, Path, Path]:
    """Random weights of `shape` (see `random_shape`) logged as kronos@champion (tagged
    `kronos.weights=random-demo`) in a fresh sqlite registry under `workdir`; returns the
    registry and the (tokenizer_dir, model_dir) checkpoints. For tests and speed runs that
    need a given shape; the tools' "real" model is `register_demo_model`."""
    spec = random_shape(shape)
    tokenizer_dir, model_dir = write_random_pair(workdir, spec, seed)
    registry = LocalRegistry.create(workdir, experiment)
    registry.log_version(
        tokenizer_dir,
        model_dir,
        spec.max_context,
        champion=True,
        example_rows=16,
        tags={"kronos.weights": "random-demo"},
    )
    return registry, tokenizer_dir, model_dir


def register_demo_model(workdir: Path, experiment: str = "kronos-demo") -> tuple[LocalRegistry, Path, Path]:
    """The shipped trained demo pair (`model_package.demo`, context DEMO_MAX_CONTEXT) logged
    as kronos@champion, with the version tags of `make serve`'s offline fallback
    (`kronos.weights=demo-trained`, `kronos.demo=true`), in a fresh sqlite registry under
    `workdir`; returns the registry and the shipped (tokenizer_dir, model_dir)."""
    from model_package.demo import DEMO_MAX_CONTEXT, demo_checkpoints
    from serving.bootstrap import DEMO_TAGS

    tokenizer_dir, model_dir = demo_checkpoints()
    registry = LocalRegistry.create(workdir, experiment)
    info = registry.log_version(
        tokenizer_dir, model_dir, DEMO_MAX_CONTEXT, champion=True, example_rows=16, tags=DEMO_TAGS
    )
    client, version = registry.client(), str(info.registered_model_version)
    for key, value in DEMO_TAGS.items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    return registry, tokenizer_dir, model_dir


def register_model(
    workdir: Path, preset: str | None = None, experiment: str = "kronos-demo"
) -> tuple[LocalRegistry, Path, Path]:
    """`register_demo_model` for `preset=None` (the default of the load tests), else
    `register_random_model` of that shape (RANDOM weights: speed runs only)."""
    if preset is None:
        return register_demo_model(workdir, experiment)
    return register_random_model(workdir, preset, experiment=experiment)


def describe_weights(preset: str | None) -> str:
    """What `register_model(workdir, preset)` serves, in words for a tool's output."""
    if preset is None:
        return "the shipped trained demo model (model_package/demo_weights)"
    return f"RANDOM weights of the {preset} shape (--preset {preset}: speed only, forecasts meaningless)"


def local_gateway_settings(champion: LocalServer, shadow: LocalServer | None = None, **overrides: Any) -> Any:
    """`GatewaySettings` for a gateway on 127.0.0.1 and free ports in front of `champion`,
    copying REST inference to `shadow` when given (a generous rate limit, one worker, the
    current user's workers); `overrides` replace any field (e.g. allow_cidrs, admin_cidrs)."""
    from serving.gateway.render import GatewaySettings

    http_port, grpc_port, status_port, relay_port = free_ports(4)
    fields: dict[str, Any] = {
        "listen_host": LOCALHOST,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "status_port": status_port,
        "shadow_relay_port": relay_port,
        "upstream_http": [f"{LOCALHOST}:{champion.http_port}"],
        "upstream_grpc": [f"{LOCALHOST}:{champion.grpc_port}"],
        "shadow_http": [f"{LOCALHOST}:{shadow.http_port}"] if shadow is not None else [],
        "allow_cidrs": ["127.0.0.0/8"],
        "admin_cidrs": ["127.0.0.1/32"],
        "rate_limit": "1000r/s",
        "rate_limit_burst": 1000,
        "worker_processes": "1",
        # as root, nginx workers would switch to `nobody`, who cannot write private temp dirs
        "user": "root" if os.geteuid() == 0 else "",
    }
    fields.update(overrides)
    return GatewaySettings(**fields)
