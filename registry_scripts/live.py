"""`kronos-registry live`: realised candles into the live store, and the live accuracy table.

The store is the one the model servers record their answers in (`KRONOS_LIVE_STORE_URI`;
default: the `make serve` state folder's `live.db`). `--actuals FILE` (CSV or Parquet with
`series_id`, `timestamp`, `close`) stores realised candles first, matched to the recorded
forecasts by series and timestamp; the table then shows, per role, model version and
horizon bucket over the window, the metrics of `serving.live.accuracy`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model_package.errors import KronosInputError

from .data import read_file
from .errors import BadDataError

STORE_VARIABLE = "KRONOS_LIVE_STORE_URI"


@dataclass(frozen=True)
class LiveRequest:
    store_uri: str | None  # None: $KRONOS_LIVE_STORE_URI, else the `make serve` store
    actuals: Path | None
    window_s: float | None  # None: KRONOS_LIVE_WINDOW_S (a week)
    as_json: bool = False


def store_uri(given: str | None) -> str:
    """--store, else $KRONOS_LIVE_STORE_URI (with $KRONOS_LIVE_STORE_PASSWORD_FILE's
    password when set), else the `make serve` state folder's live.db."""
    if given:
        return given
    if os.environ.get(STORE_VARIABLE):
        from serving.live.settings import LiveSettings

        return LiveSettings().store_url()
    from serving.launch_settings import load_launch_settings

    return load_launch_settings().live_store_uri


def live_table(request: LiveRequest, now: float | None = None) -> tuple[pd.DataFrame, dict[str, int], int]:
    """(accuracy table, store counts, realised candles stored by this call)."""
    from serving.live.accuracy import accuracy_table
    from serving.live.settings import LiveSettings
    from serving.live.store import LiveStore

    window_s = request.window_s if request.window_s is not None else LiveSettings().window_s
    store = LiveStore.open(store_uri(request.store_uri))
    try:
        written = 0
        if request.actuals is not None:
            frame = read_file(request.actuals.expanduser())
            try:
                written = store.add_actuals(frame)
            except KronosInputError as exc:
                raise BadDataError(f"{request.actuals}: {exc}") from None
        now = time.time() if now is None else now
        table = accuracy_table(store.matched(since=now - window_s))
        return table, store.counts(), written
    finally:
        store.close()


def run_live(request: LiveRequest) -> str:
    """The text `kronos-registry live` prints."""
    table, counts, written = live_table(request)
    if request.as_json:
        return json.dumps(
            {"stored_actuals": written, "store": counts, "accuracy": json.loads(table.to_json(orient="records"))}
        )
    lines = []
    if request.actuals is not None:
        lines.append(f"stored {written} realised candles from {request.actuals}")
    lines.append(f"store: {counts.get('forecasts', 0)} forecast candles, {counts.get('actuals', 0)} realised candles")
    if table.empty:
        lines.append("no recorded forecast has its realised candle yet")
    else:
        lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(lines)


def paired_metrics(
    store: str | None, champion: str, candidate: str, window_s: float | None, now: float | None = None
) -> dict[str, dict]:
    """version -> metrics on the forecast candles both versions answered for the same
    requests within the window (the promotion gate's live evidence)."""
    from serving.live.accuracy import paired_accuracy
    from serving.live.settings import LiveSettings
    from serving.live.store import LiveStore

    window_s = window_s if window_s is not None else LiveSettings().window_s
    now = time.time() if now is None else now
    live = LiveStore.open(store_uri(store))
    try:
        table = paired_accuracy(live.matched(since=now - window_s), champion, candidate)
    finally:
        live.close()
    return {str(row["model_version"]): row for row in json.loads(table.to_json(orient="records"))}
