"""SQL store of answered forecasts and realised candles, joined for live-accuracy scoring.

Two tables (SQLAlchemy Core; sqlite file by default, PostgreSQL in the compose stack):

- `live_forecasts`: one row per forecast candle of a recorded request (`ForecastRecord`):
  id (autoincrement), request_id, model_uri, model_version, role, series_id, timestamp
  (naive, microseconds), step, last_close, mean_close, one column per level of `LIVE_LEVELS`
  (`q0_05` ... `q0_95` in SQL), made_at (unix seconds). Indexes on (series_id, timestamp)
  and on made_at.
- `live_actuals`: the realised candles, primary key (series_id, timestamp), close,
  received_at (unix seconds). A later value for a key replaces the earlier one (upsert).

`LiveStore.matched` joins the two on (series_id, timestamp) and returns one row per
forecast candle whose actual has arrived: every `ForecastRecord` field, the quantiles
expanded into columns `q0.05` ... `q0.95` (`QUANTILE_COLUMNS`, `level_column(level)`), and
`actual_close`.

Timestamps are stored truncated to microseconds (forecast and actual alike, so they still
match). Several server worker processes may write one sqlite file: connections wait up to
30 s for the file lock and the file runs in WAL mode. Create a `LiveStore` in the process
that uses it (a store inherited across `fork` drops its parent's pooled connections on
first use).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from model_package.calendar import parse_timestamps
from model_package.errors import KronosInputError, brief

LIVE_LEVELS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)  # close quantiles recorded per forecast candle
BAND: tuple[float, float] = (0.1, 0.9)  # the band whose coverage is reported; nominal 0.8

SQLITE_TIMEOUT_S = 30.0  # how long a sqlite connection waits for another process's write lock
_CREATE_ATTEMPTS = 5  # table creation retries (two processes creating the tables at once)


def level_column(level: float) -> str:
    """Name of a quantile column in `matched()` frames: 0.1 -> "q0.1"."""
    return f"q{level:g}"


def _sql_level_column(level: float) -> str:
    """Name of a quantile column in SQL: 0.1 -> "q0_1" (no dots in identifiers)."""
    return level_column(level).replace(".", "_")


QUANTILE_COLUMNS: tuple[str, ...] = tuple(level_column(level) for level in LIVE_LEVELS)
assert BAND[0] in LIVE_LEVELS and BAND[1] in LIVE_LEVELS, "the band's edges must be recorded levels"


@dataclass(frozen=True)
class ForecastRecord:
    """One forecast candle of one answered request (prices in the request's units)."""

    request_id: str
    model_uri: str
    model_version: str
    role: str  # the alias served: "champion", "challenger", or "" for a plain URI
    series_id: str  # "" when the request had no series_id
    timestamp: dt.datetime  # naive: the forecast candle's timestamp
    step: int  # 1-based horizon of this candle
    last_close: float  # the history's last close (the persistence forecast)
    mean_close: float  # the forecast's close (mean over sampled paths)
    quantiles: tuple[float, ...]  # close at LIVE_LEVELS (from the sampled paths)
    made_at: float  # unix seconds when answered


_TEXT_FIELDS = ("request_id", "model_uri", "model_version", "role", "series_id")

_METADATA = sa.MetaData()

FORECASTS = sa.Table(
    "live_forecasts",
    _METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text(), nullable=False),
    sa.Column("model_uri", sa.Text(), nullable=False),
    sa.Column("model_version", sa.Text(), nullable=False),
    sa.Column("role", sa.Text(), nullable=False),
    sa.Column("series_id", sa.Text(), nullable=False),
    sa.Column("timestamp", sa.DateTime(), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("last_close", sa.Double(), nullable=False),
    sa.Column("mean_close", sa.Double(), nullable=False),
    *(sa.Column(_sql_level_column(level), sa.Double(), nullable=False) for level in LIVE_LEVELS),
    sa.Column("made_at", sa.Double(), nullable=False),
    sa.Index("ix_live_forecasts_series_timestamp", "series_id", "timestamp"),
    sa.Index("ix_live_forecasts_made_at", "made_at"),
)

ACTUALS = sa.Table(
    "live_actuals",
    _METADATA,
    sa.Column("series_id", sa.Text(), primary_key=True),
    sa.Column("timestamp", sa.DateTime(), primary_key=True),
    sa.Column("close", sa.Double(), nullable=False),
    sa.Column("received_at", sa.Double(), nullable=False),
)

# Columns of `matched()` frames, in order.
MATCHED_COLUMNS: tuple[str, ...] = (
    "request_id",
    "model_uri",
    "model_version",
    "role",
    "series_id",
    "timestamp",
    "step",
    "last_close",
    "mean_close",
    *QUANTILE_COLUMNS,
    "made_at",
    "actual_close",
)


def _naive_datetime(value: object) -> dt.datetime:
    """A naive datetime truncated to microseconds (from datetime, date, pd.Timestamp or
    np.datetime64); ValueError for anything else, NaT or a timezone-aware value."""
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    if value is pd.NaT:
        raise ValueError("timestamp is NaT")
    if isinstance(value, pd.Timestamp):
        value = value.floor("us").to_pydatetime()
    elif isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    if not isinstance(value, dt.datetime):
        raise ValueError(f"timestamp must be a datetime, got {brief(value)}")
    if value.tzinfo is not None:
        raise ValueError(f"timestamp must be timezone-naive, got {value.isoformat()}")
    return value


def _finite(name: str, value: object) -> float:
    """A finite float (ints and floats, not bool); ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {brief(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _forecast_row(record: ForecastRecord) -> dict[str, Any]:
    """A record -> the `live_forecasts` row; ValueError when a field is malformed."""
    row: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {brief(value)}")
        row[name] = value
    row["timestamp"] = _naive_datetime(record.timestamp)
    if isinstance(record.step, (bool, np.bool_)) or not isinstance(record.step, (int, np.integer)) or record.step < 1:
        raise ValueError(f"step must be an integer >= 1, got {brief(record.step)}")
    row["step"] = int(record.step)
    row["last_close"] = _finite("last_close", record.last_close)
    row["mean_close"] = _finite("mean_close", record.mean_close)
    if len(record.quantiles) != len(LIVE_LEVELS):
        raise ValueError(f"quantiles must hold {len(LIVE_LEVELS)} values (LIVE_LEVELS), got {len(record.quantiles)}")
    for level, value in zip(LIVE_LEVELS, record.quantiles, strict=True):
        row[_sql_level_column(level)] = _finite(f"quantile {level:g}", value)
    row["made_at"] = _finite("made_at", record.made_at)
    return row


def _text_column(values: pd.Series, field: str) -> list[str]:
    """Every value a str (pandas 2 object or pandas 3 str dtype), else KronosInputError."""
    texts = values.tolist()
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise KronosInputError(field, f"must be text, got {brief(value)} at row {i}")
    return texts


def _finite_column(values: pd.Series, field: str, series: Sequence[str] | None) -> np.ndarray:
    """float64 [N] of finite numbers (not bools, not text), else KronosInputError naming the row."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise KronosInputError(field, f"must hold numbers, got booleans such as {brief(values.iloc[0])} at row 0")
    if pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(numbers)
        if bad.any():
            i = int(bad.argmax())
            where = series[i] if series is not None else None
            raise KronosInputError(field, f"must be a finite number, got {brief(values.iloc[i])} at row {i}", where)
        return numbers
    numbers = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values.tolist()):
        try:
            numbers[i] = _finite(field, value)
        except ValueError:
            where = series[i] if series is not None else None
            raise KronosInputError(field, f"must be a finite number, got {brief(value)} at row {i}", where) from None
    return numbers


def _enable_wal(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """Every new sqlite connection: WAL journal (readers do not block the writer); best effort."""
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()
    except sqlite3.Error:
        pass  # e.g. a read-only file system: the default journal works too, only slower


class LiveStore:
    """Recorded forecasts and realised candles in one SQL database (see the module docstring).

    `url` is an SQLAlchemy URL: `sqlite:///path/live.db` (or `sqlite://` in memory, one
    shared connection) or `postgresql+psycopg://user@host/db`. The tables are created when
    missing. Thread-safe (one engine, pooled connections).
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            in_memory = parsed.database in (None, "", ":memory:")
            options: dict[str, Any] = {
                "connect_args": {"timeout": SQLITE_TIMEOUT_S, "check_same_thread": False},
            }
            if in_memory:
                options["poolclass"] = StaticPool  # one connection: every thread sees one database
            self._engine: Engine = sa.create_engine(parsed, **options)
            if not in_memory:
                sa.event.listen(self._engine, "connect", _enable_wal)
        elif self.dialect == "postgresql":
            self._engine = sa.create_engine(parsed, pool_pre_ping=True)
        else:
            raise ValueError(f"live store URL must be sqlite or postgresql, got {parsed.render_as_string()}")
        self._pid = os.getpid()
        self._create_tables()

    @classmethod
    def open(cls, url: str) -> LiveStore:
        """Like `LiveStore(url)`, and a sqlite file's parent folder is created first."""
        parsed = make_url(url)
        database = parsed.database
        if parsed.get_backend_name() == "sqlite" and database not in (None, "", ":memory:"):
            assert database is not None
            if not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return cls(url)

    def __enter__(self) -> LiveStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LiveStore({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (fresh connections in a forked child process)."""
        if os.getpid() != self._pid:
            self._engine.dispose(close=False)  # the parent's connections stay the parent's
            self._pid = os.getpid()
        return self._engine

    def _create_tables(self) -> None:
        """Create the tables and indexes that are missing. Two processes starting together
        may both see them missing: the loser's CREATE fails, and the retry finds them."""
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    _METADATA.create_all(connection, checkfirst=True)
                    for table in (FORECASTS, ACTUALS):
                        for index in table.indexes:
                            index.create(connection, checkfirst=True)
                return
            except sa.exc.DBAPIError:
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def add_forecasts(self, records: Sequence[ForecastRecord]) -> int:
        """Insert forecast candles in one transaction; returns the rows written.

        Raises ValueError naming the record when a field is malformed (non-str text, a
        timezone-aware timestamp, step < 1, a non-finite price, quantiles not one per
        `LIVE_LEVELS`); nothing is written then."""
        rows = []
        for i, record in enumerate(records):
            try:
                rows.append(_forecast_row(record))
            except ValueError as exc:
                raise ValueError(f"forecast record {i} (request {brief(record.request_id)}): {exc}") from None
        if not rows:
            return 0
        with self.engine.begin() as connection:
            connection.execute(sa.insert(FORECASTS), rows)
        return len(rows)

    def add_actuals(self, actuals: pd.DataFrame) -> int:
        """Upsert realised candles; returns the rows written (distinct (series_id, timestamp)).

        Columns: `series_id` (optional, text; missing -> ""), `timestamp` (naive datetimes
        or date/time strings), `close` (finite number; zero and negative allowed: spreads);
        any other column is ignored. A later value for a (series_id, timestamp) replaces the
        earlier one, within one frame too (its last row wins). Raises KronosInputError naming
        the field and the row (0-based position) when a value is invalid; nothing is written then.
        """
        if not isinstance(actuals, pd.DataFrame):
            raise KronosInputError("actuals", f"must be a table (DataFrame), got {type(actuals).__name__}")
        for field in ("timestamp", "close"):
            if field not in actuals.columns:
                columns = ", ".join(str(c) for c in actuals.columns) or "none"
                raise KronosInputError(field, f"required column is missing (columns: {columns})")
        duplicated = actuals.columns[actuals.columns.duplicated()]
        if len(duplicated):
            raise KronosInputError(str(duplicated[0]), "column appears more than once")
        if len(actuals) == 0:
            return 0
        frame = actuals.reset_index(drop=True)
        has_series = "series_id" in frame.columns
        series = _text_column(frame["series_id"], "series_id") if has_series else [""] * len(frame)
        stamps = parse_timestamps(frame["timestamp"], "timestamp", None).floor("us").to_pydatetime()
        closes = _finite_column(frame["close"], "close", series if has_series else None)
        received_at = time.time()
        latest: dict[tuple[str, dt.datetime], float] = {}
        for key, close in zip(zip(series, stamps, strict=True), closes.tolist(), strict=True):
            latest.pop(key, None)  # the last row of a key wins (and keeps its position)
            latest[key] = close
        rows = [
            {"series_id": sid, "timestamp": stamp, "close": close, "received_at": received_at}
            for (sid, stamp), close in latest.items()
        ]
        with self.engine.begin() as connection:
            connection.execute(self._upsert_actuals(), rows)
        return len(rows)

    def _upsert_actuals(self) -> sa.Insert:
        """INSERT ... ON CONFLICT (series_id, timestamp) DO UPDATE close, received_at."""
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(ACTUALS)
        return statement.on_conflict_do_update(
            index_elements=[ACTUALS.c.series_id, ACTUALS.c.timestamp],
            set_={"close": statement.excluded.close, "received_at": statement.excluded.received_at},
        )

    def matched(self, since: float | None = None, until: float | None = None) -> pd.DataFrame:
        """Forecast candles answered in [since, until) (unix seconds; None: unbounded) whose
        actual has arrived, oldest record first.

        Columns (`MATCHED_COLUMNS`): request_id, model_uri, model_version, role, series_id
        (text), timestamp (datetime64), step (int64), last_close, mean_close, q0.05 ... q0.95
        (the quantiles at `LIVE_LEVELS`), made_at, actual_close (float64)."""
        query = (
            sa.select(
                *(FORECASTS.c[name] for name in (*_TEXT_FIELDS, "timestamp", "step", "last_close", "mean_close")),
                *(FORECASTS.c[_sql_level_column(level)].label(level_column(level)) for level in LIVE_LEVELS),
                FORECASTS.c.made_at,
                ACTUALS.c.close.label("actual_close"),
            )
            .select_from(
                FORECASTS.join(
                    ACTUALS,
                    sa.and_(
                        FORECASTS.c.series_id == ACTUALS.c.series_id,
                        FORECASTS.c.timestamp == ACTUALS.c.timestamp,
                    ),
                )
            )
            .order_by(FORECASTS.c.id)
        )
        if since is not None:
            query = query.where(FORECASTS.c.made_at >= float(since))
        if until is not None:
            query = query.where(FORECASTS.c.made_at < float(until))
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        frame = pd.DataFrame([tuple(row) for row in rows], columns=list(MATCHED_COLUMNS))
        return frame.astype(_MATCHED_DTYPES)

    def counts(self) -> dict[str, int]:
        """{"forecasts": rows of live_forecasts, "actuals": rows of live_actuals}."""
        with self.engine.connect() as connection:
            forecasts = connection.execute(sa.select(sa.func.count()).select_from(FORECASTS)).scalar_one()
            actuals = connection.execute(sa.select(sa.func.count()).select_from(ACTUALS)).scalar_one()
        return {"forecasts": int(forecasts), "actuals": int(actuals)}

    def prune(self, before: float) -> dict[str, int]:
        """Delete forecasts answered and realised candles received before `before` (unix s);
        returns the rows deleted per table."""
        with self.engine.begin() as connection:
            forecasts = connection.execute(sa.delete(FORECASTS).where(FORECASTS.c.made_at < before)).rowcount
            actuals = connection.execute(sa.delete(ACTUALS).where(ACTUALS.c.received_at < before)).rowcount
        return {"forecasts": int(forecasts or 0), "actuals": int(actuals or 0)}

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()


_MATCHED_DTYPES: Mapping[str, Any] = {
    "timestamp": "datetime64[ns]",
    "step": "int64",
    "last_close": "float64",
    "mean_close": "float64",
    **dict.fromkeys(QUANTILE_COLUMNS, "float64"),
    "made_at": "float64",
    "actual_close": "float64",
}
