"""Recording answered forecasts, and turning the live store into Prometheus gauges.

`LiveRecorder` is what the model server's runtime holds:
- `offer(...)` after an answer: a sampled request (by a hash of its request id, so that a
  champion and a mirrored challenger record the same requests) goes on a bounded queue and
  never waits for the store; a full queue drops the request's candles and counts them;
- one writer thread turns queued answers into `ForecastRecord`s (mean and quantiles of the
  close from the sampled paths) and writes them in batches;
- `refresh()` recomputes the accuracy table over the rolling window and sets the
  `kronos_live_*` gauges (the runtime calls it every `KRONOS_LIVE_REFRESH_S` and after an
  ingest of realised candles).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model_package.forecaster import Forecast, PreparedRequest
from model_package.frames import CANDLE_COLUMNS

from ..metrics import LIVE_GAUGES, KronosMetrics
from .accuracy import accuracy_table
from .settings import LiveSettings
from .store import BAND, LIVE_LEVELS, ForecastRecord, LiveStore

logger = logging.getLogger("kronos.serving.live")

CLOSE = CANDLE_COLUMNS.index("close")
WRITE_BATCH = 64  # answers written per transaction at most
_STOP = object()


def sampled(request_id: str, ratio: float) -> bool:
    """Whether `request_id` is in the recorded share: the same answer for the same id in every
    process (a hash, not a random draw)."""
    if ratio >= 1:
        return True
    if ratio <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


@dataclass(frozen=True)
class Answer:
    """One answered request as the writer needs it."""

    request_id: str
    model_uri: str
    model_version: str
    role: str
    request: PreparedRequest
    forecast: Forecast
    made_at: float

    @property
    def candles(self) -> int:
        return sum(len(s.future) for s in self.request.series)


def forecast_records(answer: Answer) -> list[ForecastRecord]:
    """One record per forecast candle of every series: the close's mean and its quantiles
    at LIVE_LEVELS over the sampled paths, and the history's last close."""
    records = []
    for prepared, paths in zip(answer.request.series, answer.forecast.paths, strict=True):
        closes = paths[:, :, CLOSE].astype(np.float64)  # [S, P]
        means = closes.mean(axis=0)  # [P]
        levels = np.quantile(closes, LIVE_LEVELS, axis=0)  # [L, P]
        last_close = float(prepared.series.candles[-1, CLOSE])
        series_id = "" if prepared.series.series_id is None else str(prepared.series.series_id)
        for step, stamp in enumerate(prepared.future):
            records.append(
                ForecastRecord(
                    request_id=answer.request_id,
                    model_uri=answer.model_uri,
                    model_version=answer.model_version,
                    role=answer.role,
                    series_id=series_id,
                    timestamp=pd.Timestamp(stamp).to_pydatetime(),
                    step=step + 1,
                    last_close=last_close,
                    mean_close=float(means[step]),
                    quantiles=tuple(float(q) for q in levels[:, step]),
                    made_at=answer.made_at,
                )
            )
    return records


class LiveRecorder:
    """The runtime's side of live accuracy: a bounded queue, one writer thread, the gauges."""

    def __init__(
        self, settings: LiveSettings, metrics: KronosMetrics, open_store: Callable[[str], LiveStore] = LiveStore.open
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._open_store = open_store
        self._store: LiveStore | None = None
        self._store_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue()
        self._queued_candles = 0
        self._count_lock = threading.Lock()
        self._labels: set[tuple[str, str, str]] = set()  # gauge label sets set by the last refresh
        self._writer = threading.Thread(target=self._write_loop, name="kronos-live-writer", daemon=True)
        self._writer.start()
        metrics.live_coverage_nominal.set(BAND[1] - BAND[0])

    # -- the store -------------------------------------------------------------------------

    def store(self) -> LiveStore:
        """The store, opened on first use (a store that is down fails this call, not the
        server's start)."""
        with self._store_lock:
            if self._store is None:
                self._store = self._open_store(self.settings.store_url())
            return self._store

    # -- recording -------------------------------------------------------------------------

    def wants(self, request_id: str) -> bool:
        return sampled(request_id, self.settings.sample_ratio)

    def offer(self, answer: Answer) -> bool:
        """Queue an answer for the writer; False (and counted as dropped) when the queue
        already holds `queue_records` candles."""
        candles = answer.candles
        with self._count_lock:
            if self._queued_candles + candles > self.settings.queue_records:
                self.metrics.live_records.labels("dropped").inc(candles)
                return False
            self._queued_candles += candles
        self._queue.put(answer)
        return True

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # stop after this batch
                    break
                batch.append(item)
            self._write(batch)  # type: ignore[arg-type]

    def _write(self, answers: list[Answer]) -> None:
        candles = sum(a.candles for a in answers)
        try:
            records = [record for answer in answers for record in forecast_records(answer)]
            self.store().add_forecasts(records)
            self.metrics.live_records.labels("recorded").inc(len(records))
        except Exception as exc:  # a store that is down must not stop the writer
            self.metrics.live_records.labels("failed").inc(candles)
            logger.warning("could not record %d forecast candles in the live store: %s", candles, exc)
        finally:
            with self._count_lock:
                self._queued_candles -= candles

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (bounded) until everything queued so far is written or failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._count_lock:
                if self._queued_candles == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (bounded), stop the writer, close the store."""
        self._queue.put(_STOP)
        self._writer.join(timeout_s)
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- realised candles and gauges -------------------------------------------------------

    def add_actuals(self, actuals: pd.DataFrame) -> int:
        """Store realised candles (raises KronosInputError for bad rows); returns rows written."""
        written = self.store().add_actuals(actuals)
        self.metrics.live_actuals.inc(written)
        return written

    def refresh(self, now: float | None = None) -> pd.DataFrame:
        """Recompute accuracy over the window ending `now` and set the gauges; label sets
        that left the window get 0 forecasts and NaN values; rows older than the retention
        (never less than the window) are deleted. Returns the table."""
        now = time.time() if now is None else now
        table = accuracy_table(self.store().matched(since=now - self.settings.window_s))
        seen: set[tuple[str, str, str]] = set()
        for row in table.itertuples(index=False):
            labels = (str(row.model_version), str(row.role), str(row.horizon))
            seen.add(labels)
            for name in LIVE_GAUGES:
                self.metrics.live[name].labels(*labels).set(float(getattr(row, name)))
        for labels in self._labels - seen:
            for name, gauge in self.metrics.live.items():
                gauge.labels(*labels).set(0.0 if name == "forecasts" else float("nan"))
        self._labels |= seen
        if self.settings.retention_s > 0:
            self.store().prune(now - max(self.settings.retention_s, self.settings.window_s))
        return table
