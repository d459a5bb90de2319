"""The local model cache (serving.model_cache), the registry fallback of serving.loader and
the registry limits of ServingSettings, without servers: the registry is the sqlite one of
conftest, and an unreachable one is an HTTP URL on a port nobody listens on."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from serving.loader import (
    RegistryUnavailableError,
    load_model,
    locate,
    remember,
    resolve_uri,
)
from serving.local_server import free_port, tracking_uri
from serving.model_cache import HOST_TAG, ModelCache, VersionIdentity, work_prefix
from serving.registry_health import (
    RegistryHealth,
    apply_registry_limits,
    unreachable_cause,
)
from serving.settings import RegistryLimits, ServingSettings

REGISTRY = "http://registry.example:5000"
ONE = VersionIdentity("models:/m-1", 1000)


def fake_model(dst: Path, marker: str = "x") -> None:
    """What a download leaves: an MLflow model folder."""
    dst.mkdir(parents=True)
    (dst / "MLmodel").write_text(f"marker: {marker}\n")


def work_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- the cache ---------------------------------------------------------------------------------


def test_a_stored_version_is_found_again_by_a_new_cache_object(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY)
    path = cache.store("kronos", "3", ONE, fake_model)
    assert (path / "MLmodel").read_text() == "marker: x\n"
    again = ModelCache(tmp_path, REGISTRY)
    assert again.version_path("kronos", "3") == path
    assert again.version_path("kronos", "3", ONE) == path
    assert again.identity("kronos", "3") == ONE
    assert work_dirs(tmp_path) == []  # the work folder became the version folder


def test_a_failed_download_leaves_nothing_behind(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY)

    def broken(dst: Path) -> None:
        fake_model(dst)
        (dst / "weights.bin").write_bytes(b"half")
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(ConnectionResetError):
        cache.store("kronos", "3", ONE, broken)
    assert cache.version_path("kronos", "3") is None
    assert work_dirs(tmp_path) == []


def test_a_download_without_an_mlflow_model_is_refused(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY)
    with pytest.raises(FileNotFoundError, match="no MLmodel"):
        cache.store("kronos", "3", ONE, lambda dst: dst.mkdir())
    assert cache.version_path("kronos", "3") is None


def test_a_half_written_download_is_never_used_and_removed_once_its_process_is_gone(tmp_path):
    ModelCache(tmp_path, REGISTRY)
    interrupted = tmp_path / f".download-{dead_pid()}-{HOST_TAG}-abc"
    fake_model(interrupted / "model")
    running = tmp_path / f"{work_prefix('.download-')}def"  # a download in progress here
    fake_model(running / "model")
    elsewhere = tmp_path / f".download-{dead_pid()}-0othrhst-ghi"  # another machine's: its pids mean nothing here
    fake_model(elsewhere / "model")
    cache = ModelCache(tmp_path, REGISTRY)  # a restarted worker opens the cache
    assert not interrupted.exists()
    assert running.exists() and elsewhere.exists()
    day_old = time.time() - 2 * 24 * 3600
    os.utime(elsewhere, (day_old, day_old))
    assert cache.remove_stale_work() == [elsewhere]
    assert cache.version_path("kronos", "3") is None
    assert cache.versions("kronos") == []


def test_another_model_under_the_same_number_is_not_served_and_is_replaced(tmp_path):
    """A registry rebuilt at the same URI may reuse version numbers."""
    cache = ModelCache(tmp_path, REGISTRY)
    cache.store("kronos", "1", ONE, lambda dst: fake_model(dst, "old"))
    other = VersionIdentity("models:/m-2", 2000)
    assert cache.version_path("kronos", "1", other) is None
    path = cache.store("kronos", "1", other, lambda dst: fake_model(dst, "new"))
    assert (path / "MLmodel").read_text() == "marker: new\n"
    assert cache.identity("kronos", "1") == other
    assert work_dirs(tmp_path) == []


def test_a_copy_stored_meanwhile_by_another_worker_is_kept(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY)

    def racing(dst: Path) -> None:  # another process finishes the same download first
        ModelCache(tmp_path, REGISTRY).store("kronos", "1", ONE, lambda d: fake_model(d, "first"))
        fake_model(dst, "second")

    path = cache.store("kronos", "1", ONE, racing)
    assert (path / "MLmodel").read_text() == "marker: first\n"
    assert work_dirs(tmp_path) == []


def test_eviction_keeps_the_most_recently_used_versions_and_every_aliased_one(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY, keep=2)
    for version in ("1", "2", "3", "4", "5"):
        cache.store("kronos", version, VersionIdentity(f"models:/m-{version}", int(version)), fake_model)
        os.utime(cache.registry_dir / "kronos" / "versions" / version / "version.json", (int(version), int(version)))
    cache.record_alias("kronos", "champion", "1")
    assert cache.version_path("kronos", "2") is not None  # just used: the most recent
    assert cache.evict("kronos") == ["4", "3"]
    assert sorted(cache.versions("kronos")) == ["1", "2", "5"]
    assert cache.version_path("kronos", "3") is None
    assert work_dirs(tmp_path) == []


def test_alias_records_are_replaced_atomically(tmp_path, monkeypatch):
    cache = ModelCache(tmp_path, REGISTRY)
    first = cache.record_alias("kronos", "champion", "3", resolved_at=1_800_000_000)
    assert cache.alias_record("kronos", "champion") == first
    assert first.resolved_at_text == "2027-01-15T08:00:00Z"

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)  # the write dies half-way
    with pytest.raises(OSError, match="disk full"):
        cache.record_alias("kronos", "champion", "4")
    monkeypatch.undo()
    assert cache.alias_record("kronos", "champion") == first  # the old record, whole
    aliases = cache.registry_dir / "kronos" / "aliases"
    assert sorted(p.name for p in aliases.iterdir()) == ["champion.json"]  # no temporary file left
    (aliases / "champion.json").write_text("{not json")
    assert cache.alias_record("kronos", "champion") is None


def test_registries_do_not_share_versions_but_credentials_do_not_matter(tmp_path):
    cache = ModelCache(tmp_path, REGISTRY)
    cache.store("kronos", "1", ONE, fake_model)
    assert ModelCache(tmp_path, "http://other:5000").version_path("kronos", "1") is None
    with_login = ModelCache(tmp_path, "http://user:secret@registry.example:5000")
    assert with_login.version_path("kronos", "1") is not None
    assert "secret" not in (with_login.registry_dir / "registry.json").read_text()


# -- registry limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("poll_s", "timeout_s", "retries", "expected"),
    [
        (0, 5, 1, RegistryLimits(5, 1)),  # no polling: as set
        (60, 5, 1, RegistryLimits(5, 1)),  # fits: 10 s in 60 s
        (7, 5, 1, RegistryLimits(3, 1)),  # timeout lowered first
        (3, 5, 1, RegistryLimits(1, 1)),
        (1, 5, 1, RegistryLimits(1, 0)),  # then the retries
        (0.5, 5, 1, RegistryLimits(1, 0)),  # MLflow's whole seconds: 1 s at least
    ],
)
def test_one_alias_check_fits_in_one_poll_interval(monkeypatch, poll_s, timeout_s, retries, expected):
    monkeypatch.setenv("KRONOS_ALIAS_POLL_S", str(poll_s))
    monkeypatch.setenv("KRONOS_REGISTRY_TIMEOUT_S", str(timeout_s))
    monkeypatch.setenv("KRONOS_REGISTRY_RETRIES", str(retries))
    limits = ServingSettings().registry_limits
    assert limits == expected
    assert limits.check_s <= max(poll_s, 1) or poll_s == 0


def test_the_cache_folder_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("KRONOS_MODEL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ServingSettings().model_cache_dir == tmp_path / "kronos-serving" / "models"
    monkeypatch.setenv("KRONOS_MODEL_CACHE_DIR", str(tmp_path / "here"))
    assert ServingSettings().model_cache_dir == tmp_path / "here"


# -- the loader with and without the registry --------------------------------------------------


@pytest.fixture
def bounded_registry_calls(monkeypatch) -> Iterator[None]:
    """MLflow's HTTP variables as the server sets them, restored afterwards."""
    for name, value in apply_registry_limits(RegistryLimits(1, 0)).items():
        monkeypatch.setenv(name, value)
    yield


@pytest.fixture
def down_registry(bounded_registry_calls) -> Iterator[str]:
    """An HTTP registry URL that refuses connections, as MLflow's registry."""
    url = f"http://127.0.0.1:{free_port()}"
    with tracking_uri(url):
        yield url


def test_a_refused_connection_is_an_unreachable_registry_and_a_missing_alias_is_not(serving_registry, down_registry):
    with pytest.raises(Exception) as refused:
        resolve_uri("models:/kronos@champion")
    cause = unreachable_cause(refused.value)
    assert cause is not None and "Connection refused" in cause and "\n" not in cause
    with tracking_uri(serving_registry.tracking_uri), pytest.raises(Exception) as missing:
        resolve_uri("models:/kronos@no-such-alias")
    assert unreachable_cause(missing.value) is None


class Unavailable(BaseHTTPRequestHandler):
    """What a proxy in front of a dead registry answers: 503 to everything."""

    def do_GET(self) -> None:
        body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "upstream down"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_5xx_answer_is_an_unreachable_registry(bounded_registry_calls):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tracking_uri(f"http://127.0.0.1:{server.server_address[1]}"), pytest.raises(Exception) as answered:
            resolve_uri("models:/kronos@champion")
    finally:
        server.shutdown()
        server.server_close()
    cause = unreachable_cause(answered.value)
    assert cause is not None and "503" in cause and f"127.0.0.1:{server.server_address[1]}" in cause, cause


def test_a_registry_that_never_answers_times_out_after_the_configured_timeout(bounded_registry_calls):
    """The kernel accepts the connection (listen backlog), nobody reads the request."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}"), pytest.raises(Exception) as hung:
            resolve_uri("models:/kronos@champion")
    cause = unreachable_cause(hung.value)
    assert cause is not None and "timed out" in cause and "read timeout=1" in cause, cause


def test_locate_downloads_once_then_serves_the_cached_copy(serving_registry, tmp_path):
    with tracking_uri(serving_registry.tracking_uri):
        cache = ModelCache(tmp_path, mlflow.get_registry_uri())
        source = locate("models:/kronos@champion", cache)
        assert (source.version, source.offline) == ("1", None)
        assert Path(source.load_uri) == cache.version_path("kronos", "1")
        remember(source, cache)
        assert cache.alias_record("kronos", "champion").version == "1"

        def no_download(*args: object) -> Path:
            raise AssertionError("a cached version was downloaded again")

        cache.store = no_download  # type: ignore[method-assign]
        assert locate("models:/kronos@champion", cache).load_uri == source.load_uri
        assert locate("models:/kronos/1", cache).load_uri == source.load_uri  # an explicit version too


def test_without_the_registry_the_alias_record_is_served_from_the_cache(serving_registry, down_registry, tmp_path):
    cache = ModelCache(tmp_path, mlflow.get_registry_uri())  # the unreachable registry's cache
    with pytest.raises(RegistryUnavailableError, match=r"unreachable \(.*Connection refused.*no cached copy"):
        locate("models:/kronos@champion", cache)
    with tracking_uri(serving_registry.tracking_uri):  # what an earlier start downloaded
        version = MlflowClient().get_model_version("kronos", "2")
        cache.store(
            "kronos",
            "2",
            VersionIdentity(version.source, version.creation_timestamp),
            lambda dst: mlflow.artifacts.download_artifacts(artifact_uri="models:/kronos/2", dst_path=str(dst)),
        )
    cache.record_alias("kronos", "champion", "2", resolved_at=1_800_000_000)
    source = locate("models:/kronos@champion", cache)
    assert source.version == "2"
    assert source.offline is not None and "Connection refused" in source.offline.cause
    assert source.offline.description == "resolved at 2027-01-15T08:00:00Z"
    assert load_model(source).version == "2"
    assert locate("models:/kronos/2", cache).offline is not None  # an explicit version too
    with pytest.raises(RegistryUnavailableError):
        locate("models:/kronos/1", cache)
    with pytest.raises(RegistryUnavailableError):
        locate("models:/kronos@challenger", cache)


class Checks:
    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []

    def registry_checked(self, ok: bool, reachable: bool) -> None:
        self.calls.append((ok, reachable))


def test_a_run_of_failed_checks_logs_one_warning_and_its_end_one_info(caplog):
    logger = logging.getLogger("kronos.test.registry")
    checks = Checks()
    health = RegistryHealth(checks, logger)
    with caplog.at_level(logging.INFO, logger.name):
        assert health.ok() is None
        assert health.failed("ConnectionRefusedError", reachable=False, consequence="keeps serving version 1")
        for _ in range(4):
            assert not health.failed("ConnectionRefusedError", reachable=False, consequence="keeps serving version 1")
        outage = health.ok()
    assert outage is not None and outage[1] == 5
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2
    assert messages[0] == ("WARNING", "registry unreachable (ConnectionRefusedError); keeps serving version 1")
    level, text = messages[1]
    assert level == "INFO" and "answers again after" in text and "(5 failed checks)" in text
    assert checks.calls == [(True, True)] + [(False, False)] * 5 + [(True, True)]
    assert (health.ok_checks, health.failed_checks) == (2, 5)
