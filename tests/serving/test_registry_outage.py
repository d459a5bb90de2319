"""The model server without its registry (a real `mlflow server` stopped and started again
on the same port, a real MLServer): a killed worker comes back from the local model cache,
a cold start does too, the outage is logged once and exported, and once the registry
answers again the first successful check sees a moved alias."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from serving_helpers import TINY_MAX_CONTEXT, Server, history, metric_value, start_server, wait_for
from support import HttpProcess, start_mlflow_server

from model_package.log_model import log_kronos_model
from serving.loader import locate, open_cache, remember
from serving.local_server import MODEL_NAME, free_port, http_ok, tracking_uri

pytestmark = pytest.mark.integration

POLL_S = "1"  # KRONOS_ALIAS_POLL_S of the servers under test
FRAME = history(["R"], seed=5)


@dataclass
class Registry:
    """`mlflow server` (sqlite backend) on a fixed port, so it can stop and come back at
    the same URL."""

    root: Path
    port: int
    process: HttpProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is None:
            self.starts += 1
            self.process = start_mlflow_server(
                f"sqlite:///{self.root / 'mlflow.db'}",
                self.root / "artifacts",
                self.root / f"mlflow-{self.starts}.log",
                port=self.port,
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        assert not http_ok(f"{self.url}/health", timeout_s=2), "the registry still answers"

    def set_champion(self, version: str) -> None:
        MlflowClient(tracking_uri=self.url, registry_uri=self.url).set_registered_model_alias(
            MODEL_NAME, "champion", version
        )


@pytest.fixture(scope="module")
def registry(serving_registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """`kronos` v1 and v2 (conftest's checkpoints) logged over HTTP; v1 is champion."""
    running = Registry(tmp_path_factory.mktemp("registry-outage"), free_port())
    running.start()
    try:
        with tracking_uri(running.url):
            experiment_id = MlflowClient().create_experiment("registry-outage")
            for version in ("1", "2"):
                tokenizer_dir, model_dir = serving_registry.checkpoints[version]
                with mlflow.start_run(experiment_id=experiment_id):
                    log_kronos_model(
                        tokenizer_dir,
                        model_dir,
                        registered_model_name=MODEL_NAME,
                        max_context=TINY_MAX_CONTEXT,
                        example_rows=16,
                    )
        running.set_champion("1")
        yield running
    finally:
        running.stop()


def served_version(server: Server, client: httpx.Client) -> str | None:
    """The model version a forecast comes from; None for any other answer (no worker)."""
    try:
        reply = server.infer(client, FRAME, {"pred_len": 2, "top_k": 1})
    except httpx.HTTPError:
        return None
    return reply.json()["parameters"]["model_version"] if reply.status_code == 200 else None


def messages(server: Server | Path) -> list[str]:
    """The `message` of every JSON log line of the server (its workers' too), in order."""
    log = server if isinstance(server, Path) else server.log
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(str(record.get("message", "")))
    return found


def server_env(cache_dir: Path) -> dict[str, str]:
    return {"KRONOS_ALIAS_POLL_S": POLL_S, "KRONOS_MODEL_CACHE_DIR": str(cache_dir)}


def test_a_killed_worker_serves_the_cached_version_while_the_registry_is_down(registry, tmp_path):
    registry.start()
    registry.set_champion("1")
    server = start_server(tmp_path / "mlserver", registry.url, env=server_env(tmp_path / "model-cache"))
    try:
        with httpx.Client(timeout=60) as client:
            assert served_version(server, client) == "1"
            registry.stop()
            (old,) = server.worker_pids()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: served_version(server, client) == "1", "the restarted worker to serve version 1")
            assert server.worker_pids() - {old}

            cached = [m for m in messages(server) if "serving cached kronos version 1 (resolved at" in m]
            assert len(cached) == 1, cached
            assert cached[0].startswith("registry unreachable (") and "Connection refused" in cached[0]
            text = server.metrics()
            assert metric_value(text, "kronos_registry_up") == 0
            assert metric_value(text, "kronos_registry_checks_total", result="failed") >= 1
            # every check of the new worker fails while the registry is down, so the ok
            # checks counted now are the dead worker's (kept or dropped: either way fixed)
            ok_of_dead_worker = metric_value(text, "kronos_registry_checks_total", result="ok")

            registry.start()
            registry.set_champion("2")
            ok_before_move = metric_value(server.metrics(), "kronos_registry_checks_total", result="ok")
            wait_for(lambda: served_version(server, client) == "2", "the promotion to be served")

        # The check in flight when the alias moved may have seen version 1; the next one
        # started after it moved. Counting checks, not seconds, keeps this exact on a busy
        # machine: at most 2 successful checks of the new worker after the move.
        moved = [
            int(match[1])
            for m in messages(server)
            if (match := re.search(r"moved from version 1 to 2 \(successful check (\d+) of this worker\)", m))
        ]
        assert moved, messages(server)[-20:]
        assert moved[0] <= ok_before_move - ok_of_dead_worker + 2, (moved, ok_before_move, ok_of_dead_worker)
        lines = messages(server)
        back = [i for i, m in enumerate(lines) if "answers again after" in m]
        assert len(back) == 1 and "failed checks)" in lines[back[0]], [lines[i] for i in back]
        text = server.metrics()
        assert metric_value(text, "kronos_registry_up") == 1
        assert metric_value(text, "kronos_model_version") == 2
        # the outage is one WARNING per worker that saw it start, none per failed check
        during = [m for m in lines[: back[0]] if m.startswith("registry unreachable")]
        assert len(during) <= 2, during  # the killed worker's and the new worker's
    finally:
        server.stop()
        registry.start()
        registry.set_champion("1")


def test_a_cold_start_with_the_registry_down_serves_the_cached_version(registry, tmp_path):
    registry.start()
    registry.set_champion("2")
    cache_dir = tmp_path / "model-cache"
    with tracking_uri(registry.url):  # what an earlier run of the server left in its cache
        cache = open_cache(cache_dir, 3)
        remember(locate(f"models:/{MODEL_NAME}@champion", cache), cache)
    registry.stop()
    try:
        server = start_server(tmp_path / "mlserver", registry.url, env=server_env(cache_dir))
        try:
            with httpx.Client(timeout=60) as client:
                assert served_version(server, client) == "2"
            assert metric_value(server.metrics(), "kronos_registry_up") == 0
            cached = [m for m in messages(server) if "serving cached kronos version 2 (resolved at" in m]
            assert len(cached) == 1, cached
        finally:
            server.stop()
    finally:
        registry.start()
        registry.set_champion("1")


def test_a_cold_start_with_the_registry_down_and_no_cache_fails_with_one_line(registry, tmp_path):
    registry.stop()
    try:
        with pytest.raises(RuntimeError, match="mlserver exited"):
            start_server(tmp_path / "mlserver", registry.url, env=server_env(tmp_path / "empty-cache"))
    finally:
        registry.start()
    lines = messages(tmp_path / "mlserver" / "mlserver.log")
    cause = [m for m in lines if m.startswith("could not load models:/kronos@champion")]
    assert len(cause) == 1, lines[-20:]
    assert "unreachable (" in cause[0] and "Connection refused" in cause[0] and "no cached copy" in cause[0]
