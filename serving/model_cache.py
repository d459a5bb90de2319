"""Local copies of registry model versions, so that a (re)started server needs no registry.

    cache = ModelCache(Path("~/.cache/kronos-serving/models").expanduser(), mlflow.get_registry_uri())
    path = cache.version_path("kronos", "3", identity)         # None: not (or not this) v3
    path = cache.store("kronos", "3", identity, download)      # download(dst) fills dst
    cache.record_alias("kronos", "champion", "3")
    cache.alias_record("kronos", "champion")                   # AliasRecord(version="3", ...)

Layout under `root` (one folder per registry, named by a hash of its URI without
credentials, because version 3 of one registry is not version 3 of another):

    <registry>/registry.json                      the registry URI (credentials removed)
    <registry>/<model>/versions/<n>/model/        the MLflow model of version n
    <registry>/<model>/versions/<n>/version.json  what the registry said version n is
    <registry>/<model>/aliases/<alias>.json       the alias' last resolved version
    .download-<pid>-<host>-*/, .evict-*/          work folders (never read)

A version folder appears in one atomic rename of a complete download, and leaves by a
rename before it is deleted, so a half-written or half-deleted copy is never used; work
folders of processes that are gone are removed when a cache is opened (those of another
machine sharing the folder after a day). Alias records are replaced atomically. Versions
are immutable, but a registry rebuilt at the same URI may reuse a number: `version.json`
keeps the version's source and creation time, and a copy whose identity differs from the
registry's answer is downloaded again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psutil

VERSION_FILE = "version.json"
MODEL_DIR = "model"
DOWNLOAD_PREFIX = ".download-"
EVICT_PREFIX = ".evict-"
# A work folder of another machine (replicas sharing a cache volume: their process ids mean
# nothing here) is removed only when it is this old (s).
FOREIGN_WORK_MAX_AGE_S = 24 * 3600
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@dataclass(frozen=True)
class VersionIdentity:
    """What the registry says a version is: its model source and creation time (ms)."""

    source: str
    created_ms: int


@dataclass(frozen=True)
class AliasRecord:
    """The version an alias pointed at when the registry last answered (unix time, s)."""

    model: str
    alias: str
    version: str
    resolved_at: float

    @property
    def resolved_at_text(self) -> str:
        return utc_text(self.resolved_at)


def utc_text(timestamp: float) -> str:
    """Unix time as ISO 8601 UTC to the second (`2026-11-30T18:00:00Z`)."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def redact_uri(uri: str) -> str:
    """The URI without user name and password (`https://u:p@host/x` -> `https://host/x`)."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def _component(name: str) -> str:
    """A registry name as one safe path component (ValueError for names that are not)."""
    if not name or name in (".", ".."):
        raise ValueError(f"{name!r} cannot name a cache folder")
    return quote(name, safe="")


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as sink:
            json.dump(data, sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def work_prefix(kind: str) -> str:
    """The name start of this process's work folders: `<kind><pid>-<host tag>-`."""
    return f"{kind}{os.getpid()}-{HOST_TAG}-"


def _work_abandoned(work_dir: Path) -> bool:
    """Whether the process that made a work folder is gone: it ran on this machine and its
    process id is not in use, or the folder is older than FOREIGN_WORK_MAX_AGE_S."""
    parts = work_dir.name.split("-")
    if len(parts) >= 3 and parts[1].isdigit() and parts[2] == HOST_TAG:
        return not psutil.pid_exists(int(parts[1]))
    try:
        return time.time() - work_dir.stat().st_mtime > FOREIGN_WORK_MAX_AGE_S
    except OSError:
        return False


class ModelCache:
    """The cached versions and alias records of one registry under `root` (see module doc);
    at most `keep` versions per model besides those an alias record names."""

    def __init__(self, root: Path, registry_uri: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root).expanduser()
        self.registry_uri = redact_uri(registry_uri)
        self.keep = keep
        key = hashlib.sha256(self.registry_uri.encode()).hexdigest()[:16]
        self.registry_dir = self.root / key
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        if not (self.registry_dir / "registry.json").exists():
            _write_json_atomic(self.registry_dir / "registry.json", {"registry_uri": self.registry_uri})
        self.remove_stale_work()

    # -- versions ----------------------------------------------------------------------------

    def _version_dir(self, model: str, version: str) -> Path:
        if not version.isdigit():
            raise ValueError(f"registry version must be a number, got {version!r}")
        return self.registry_dir / _component(model) / "versions" / version

    def identity(self, model: str, version: str) -> VersionIdentity | None:
        """What the cached copy of `version` is (None when it is not cached)."""
        data = _read_json(self._version_dir(model, version) / VERSION_FILE)
        if data is None:
            return None
        try:
            return VersionIdentity(str(data["source"]), int(data["created_ms"]))
        except (KeyError, TypeError, ValueError):
            return None

    def cached_at(self, model: str, version: str) -> float | None:
        """When the copy of `version` was downloaded (unix time, s), None when not cached."""
        data = _read_json(self._version_dir(model, version) / VERSION_FILE)
        value = data.get("downloaded_at") if data is not None else None
        return float(value) if isinstance(value, (int, float)) else None

    def version_path(self, model: str, version: str, identity: VersionIdentity | None = None) -> Path | None:
        """The cached MLflow model folder of `version` (marked as just used); None when it
        is not cached, or when `identity` is given and the copy is another model."""
        cached = self.identity(model, version)
        path = self._version_dir(model, version) / MODEL_DIR
        if cached is None or not path.is_dir() or (identity is not None and cached != identity):
            return None
        with contextlib.suppress(OSError):  # last use: what eviction keeps
            os.utime(self._version_dir(model, version) / VERSION_FILE)
        return path

    def store(self, model: str, version: str, identity: VersionIdentity, download: Callable[[Path], object]) -> Path:
        """Download `version` with `download(dst)` (it fills the folder `dst`) into a work
        folder, then move it into place in one rename; returns the cached model folder.

        A copy another process put in place meanwhile is kept when it is the same version
        (`identity`), replaced when it is not. A failed download leaves nothing behind.
        """
        target = self._version_dir(model, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=work_prefix(DOWNLOAD_PREFIX)))
        try:
            download(work / MODEL_DIR)
            if not (work / MODEL_DIR / "MLmodel").is_file():
                raise FileNotFoundError(f"the download of {model} version {version} has no MLmodel file")
            record = {**asdict(identity), "model": model, "version": version, "downloaded_at": time.time()}
            _write_json_atomic(work / VERSION_FILE, record)
            try:
                os.rename(work, target)
            except OSError:  # another process stored it first (or an older copy is there)
                if self.identity(model, version) != identity:
                    self._remove(target)
                    os.rename(work, target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return target / MODEL_DIR

    def versions(self, model: str) -> list[str]:
        """The cached versions of `model`, most recently used first."""
        root = self.registry_dir / _component(model) / "versions"
        found = []
        for entry in root.iterdir() if root.is_dir() else ():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and (entry / VERSION_FILE).is_file():
                    found.append((entry.joinpath(VERSION_FILE).stat().st_mtime, int(entry.name), entry.name))
        return [name for _, _, name in sorted(found, reverse=True)]

    def evict(self, model: str) -> list[str]:
        """Remove the versions of `model` beyond the `keep` most recently used, except
        those an alias record names; returns the removed versions."""
        aliased = {record.version for record in self.alias_records(model)}
        spare = [v for v in self.versions(model) if v not in aliased]
        removed = spare[self.keep :]
        for version in removed:
            self._remove(self._version_dir(model, version))
        return removed

    def _remove(self, version_dir: Path) -> None:
        """Take a version folder out of use in one rename, then delete it."""
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=work_prefix(EVICT_PREFIX)))
        with contextlib.suppress(FileNotFoundError):
            os.rename(version_dir, work / "version")
        shutil.rmtree(work, ignore_errors=True)

    def remove_stale_work(self) -> list[Path]:
        """Delete the work folders of processes that no longer run (interrupted downloads)."""
        removed = []
        for entry in self.root.iterdir():
            if entry.name.startswith((DOWNLOAD_PREFIX, EVICT_PREFIX)) and _work_abandoned(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    # -- aliases -----------------------------------------------------------------------------

    def _alias_path(self, model: str, alias: str) -> Path:
        return self.registry_dir / _component(model) / "aliases" / f"{_component(alias)}.json"

    def record_alias(self, model: str, alias: str, version: str, resolved_at: float | None = None) -> AliasRecord:
        """Remember that `alias` points at `version` (now, unless `resolved_at` is given)."""
        record = AliasRecord(model, alias, version, time.time() if resolved_at is None else resolved_at)
        _write_json_atomic(self._alias_path(model, alias), asdict(record))
        return record

    def alias_record(self, model: str, alias: str) -> AliasRecord | None:
        """The last recorded version of `alias` (None when there is none or it is unreadable)."""
        data = _read_json(self._alias_path(model, alias))
        try:
            return AliasRecord(model, alias, str(data["version"]), float(data["resolved_at"])) if data else None
        except (KeyError, TypeError, ValueError):
            return None

    def alias_records(self, model: str) -> list[AliasRecord]:
        """Every alias record of `model`."""
        root = self.registry_dir / _component(model) / "aliases"
        records = []
        for path in sorted(root.glob("*.json")) if root.is_dir() else ():
            data = _read_json(path)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                if data is not None:
                    records.append(
                        AliasRecord(model, str(data["alias"]), str(data["version"]), float(data["resolved_at"]))
                    )
        return records
