"""Live-accuracy store (sqlite files and a real PostgreSQL cluster) and its metrics."""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from support import Postgres

from model_package.errors import KronosInputError
from serving.live import (
    BAND,
    HORIZON_BUCKETS,
    LIVE_LEVELS,
    METRICS,
    QUANTILE_COLUMNS,
    ForecastRecord,
    LiveStore,
    accuracy_table,
    horizon_bucket,
    level_column,
)
from serving.live.store import MATCHED_COLUMNS

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2024, 1, 2, 9, 30)
QUANTILE_OFFSETS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # around the mean, one per LIVE_LEVELS


def record(
    request_id: str,
    series_id: str,
    step: int,
    *,
    version: str = "1",
    role: str = "champion",
    made_at: float = 1000.0,
    mean: float = 101.0,
    last: float = 100.0,
    timestamp: dt.datetime | None = None,
) -> ForecastRecord:
    """A forecast candle `step` minutes after T0 (the history ends at T0)."""
    return ForecastRecord(
        request_id=request_id,
        model_uri=f"models:/kronos@{role}" if role else f"models:/kronos/{version}",
        model_version=version,
        role=role,
        series_id=series_id,
        timestamp=timestamp or T0 + dt.timedelta(minutes=step),
        step=step,
        last_close=last,
        mean_close=mean,
        quantiles=tuple(mean + offset for offset in QUANTILE_OFFSETS),
        made_at=made_at,
    )


# -- stores -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[Postgres]:
    """One throwaway PostgreSQL cluster for this module."""
    cluster = Postgres.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def fresh_postgres_database(cluster: Postgres) -> str:
    """A new empty database on the cluster; its URL."""
    name = f"live_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return cluster.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store: a sqlite file in a folder that does not exist yet, or a fresh
    PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'live.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_cluster"))


@pytest.fixture
def store(store_url: str) -> Iterator[LiveStore]:
    with LiveStore.open(store_url) as opened:
        yield opened


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[LiveStore]:
    with LiveStore.open(f"sqlite:///{tmp_path / 'live.db'}") as opened:
        yield opened


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip(store: LiveStore) -> None:
    """Champion and challenger answer the same request; actuals arrive later, in two posts
    (one candle corrected, one never arriving); matched() joins and filters right."""
    champion = [record("r1", "AAA", step, made_at=1000.0) for step in (1, 2, 3)]
    challenger = [
        record("r1", "AAA", step, version="2", role="challenger", mean=99.0, made_at=1000.5) for step in (1, 2, 3)
    ]
    no_series = [record("r2", "", 1, version="3", role="", made_at=2000.0, last=10.0, mean=10.5)]
    never = [record("r3", "BBB", 1, made_at=2100.0)]
    # A pandas timestamp with sub-microsecond digits: stored (and matched) at microseconds.
    precise = [record("r4", "CCC", 1, made_at=2200.0, timestamp=pd.Timestamp("2024-01-02 09:31:00.123456789"))]
    assert store.add_forecasts(champion + challenger + no_series + never + precise) == 9
    assert store.add_forecasts([]) == 0
    assert store.matched().empty

    first = pd.DataFrame(
        {
            "series_id": ["AAA", "AAA", "ZZZ"],
            "timestamp": ["2024-01-02 09:31", "2024-01-02 09:32", "2024-01-02 09:31"],
            "close": [102.0, 98.0, 5.0],
            "volume": [1.0, 2.0, 3.0],  # ignored
        }
    )
    assert store.add_actuals(first) == 3
    precise_actual = {"series_id": ["CCC"], "timestamp": ["2024-01-02 09:31:00.123456"], "close": [103.0]}
    assert store.add_actuals(pd.DataFrame(precise_actual)) == 1
    # No series_id column: the candles of requests without one. Later: a correction of AAA
    # 09:32 and the AAA 09:33 candle.
    assert store.add_actuals(pd.DataFrame({"timestamp": [T0 + dt.timedelta(minutes=1)], "close": [11.0]})) == 1
    later = pd.DataFrame(
        {
            "series_id": ["AAA", "AAA"],
            "timestamp": pd.to_datetime(["2024-01-02 09:32", "2024-01-02 09:33"]),
            "close": [99.5, 97.0],
        }
    )
    assert store.add_actuals(later) == 2
    assert store.counts() == {"forecasts": 9, "actuals": 6}

    matched = store.matched()
    assert list(matched.columns) == list(MATCHED_COLUMNS)
    assert [c for c in matched.columns if c.startswith("q")] == list(QUANTILE_COLUMNS)
    assert len(matched) == 8  # all but BBB
    assert matched["timestamp"].dtype.kind == "M" and matched["step"].dtype == np.int64
    keyed = matched.set_index(["request_id", "role", "step"])
    assert keyed.loc[("r1", "champion", 1), "actual_close"] == 102.0
    assert keyed.loc[("r1", "champion", 2), "actual_close"] == 99.5  # the later value won
    assert keyed.loc[("r1", "challenger", 2), "actual_close"] == 99.5
    assert keyed.loc[("r1", "challenger", 3), "actual_close"] == 97.0
    assert keyed.loc[("r1", "challenger", 3), "model_version"] == "2"
    assert keyed.loc[("r1", "challenger", 3), "mean_close"] == 99.0
    assert keyed.loc[("r2", "", 1), "actual_close"] == 11.0
    assert keyed.loc[("r2", "", 1), "series_id"] == ""
    assert keyed.loc[("r2", "", 1), "model_uri"] == "models:/kronos/3"
    assert keyed.loc[("r4", "champion", 1), "actual_close"] == 103.0
    assert keyed.loc[("r4", "champion", 1), "timestamp"] == pd.Timestamp("2024-01-02 09:31:00.123456")
    row = keyed.loc[("r1", "champion", 3)]
    assert row["timestamp"] == pd.Timestamp(T0 + dt.timedelta(minutes=3))
    assert [row[c] for c in QUANTILE_COLUMNS] == [101.0 + o for o in QUANTILE_OFFSETS]
    assert (row["last_close"], row["made_at"], row["series_id"]) == (100.0, 1000.0, "AAA")

    assert list(store.matched(since=1500.0)["request_id"]) == ["r2", "r4"]
    assert list(store.matched(until=1000.5)["role"]) == ["champion"] * 3  # [since, until)
    assert list(store.matched(since=1000.5, until=2000.0)["role"]) == ["challenger"] * 3

    table = accuracy_table(store.matched(until=1500.0))
    assert list(zip(table["role"], table["horizon"], table["forecasts"], strict=True)) == [
        ("challenger", "1", 1),
        ("challenger", "2-5", 2),
        ("champion", "1", 1),
        ("champion", "2-5", 2),
    ]


def test_prune_deletes_what_is_older_than_the_cut(store: LiveStore) -> None:
    store.add_forecasts([record("old", "AAA", 1, made_at=100.0), record("new", "AAA", 2, made_at=300.0)])
    store.add_actuals(pd.DataFrame({"series_id": ["AAA"], "timestamp": [T0], "close": [1.0]}))
    assert store.prune(before=200.0) == {"forecasts": 1, "actuals": 0}  # the actual arrived just now
    assert store.counts() == {"forecasts": 1, "actuals": 1}
    assert store.prune(before=time.time() + 1) == {"forecasts": 1, "actuals": 1}
    assert store.counts() == {"forecasts": 0, "actuals": 0}


def test_reopen_keeps_rows(store_url: str) -> None:
    """A second store on the same database (another worker, a restart) finds the tables
    and the rows; creating the tables again is a no-op."""
    with LiveStore.open(store_url) as first:
        first.add_forecasts([record("r1", "AAA", 1)])
        with LiveStore(store_url) as second:
            second.add_actuals(
                pd.DataFrame({"series_id": ["AAA"], "timestamp": [T0 + dt.timedelta(minutes=1)], "close": [1.5]})
            )
            assert second.counts() == {"forecasts": 1, "actuals": 1}
        assert first.matched()["actual_close"].tolist() == [1.5]
        tables = sa.inspect(first.engine).get_table_names()
        assert sorted(t for t in tables if t.startswith("live_")) == ["live_actuals", "live_forecasts"]


WRITER = textwrap.dedent(
    """
    import datetime as dt, sys
    import pandas as pd
    from serving.live import ForecastRecord, LiveStore

    url, name, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = LiveStore(url)  # both processes start on a file without tables
    t0 = dt.datetime(2024, 1, 1)
    for b in range(batches):
        stamps = [t0 + dt.timedelta(minutes=10 * b + s) for s in range(10)]
        store.add_forecasts([
            ForecastRecord(f"{name}-{b}", "models:/kronos@champion", "1", "champion", name, t, s + 1,
                           100.0, 101.0, (96.0, 97.0, 98.0, 101.0, 104.0, 105.0, 106.0), 1000.0 + b)
            for s, t in enumerate(stamps)
        ])
        store.add_actuals(pd.DataFrame({"series_id": name, "timestamp": stamps, "close": 100.5}))
    store.close()
    """
)


def test_two_worker_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    """Two processes (as two server workers) create the tables together and write one file."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, name, "25"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for name in ("w1", "w2")
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    with LiveStore(url) as store:
        assert store.counts() == {"forecasts": 500, "actuals": 500}
        matched = store.matched()
        assert len(matched) == 500 and set(matched["series_id"]) == {"w1", "w2"}
        with store.engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
    assert mode == "wal"


def test_in_memory_store_is_shared_across_threads() -> None:
    """`sqlite://`: one in-memory database that a recorder thread and a request thread share."""
    import threading

    with LiveStore("sqlite://") as store:
        worker = threading.Thread(target=store.add_forecasts, args=([record("r1", "AAA", 1)],))
        worker.start()
        worker.join()
        assert store.counts()["forecasts"] == 1


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "field", "words"),
    [
        (
            pd.DataFrame({"timestamp": ["2024-01-02 09:31", "not a date"], "close": [1.0, 2.0]}),
            "timestamp",
            "parseable",
        ),
        (pd.DataFrame({"timestamp": ["2024-01-02 09:31", None], "close": [1.0, 2.0]}), "timestamp", "row 1"),
        (pd.DataFrame({"timestamp": [1.7e18, 1.8e18], "close": [1.0, 2.0]}), "timestamp", "numbers"),
        (
            pd.DataFrame({"timestamp": pd.to_datetime(["2024-01-02 09:31"]).tz_localize("UTC"), "close": [1.0]}),
            "timestamp",
            "timezone",
        ),
        (pd.DataFrame({"timestamp": ["2024-01-02T09:31:00+01:00"], "close": [1.0]}), "timestamp", "timezone"),
        (
            pd.DataFrame({"timestamp": ["2024-01-02 09:31", "2024-01-02 09:32"], "close": [1.0, np.nan]}),
            "close",
            "row 1",
        ),
        (pd.DataFrame({"timestamp": ["2024-01-02 09:31"], "close": [np.inf]}), "close", "finite"),
        (
            pd.DataFrame({"timestamp": ["2024-01-02 09:31", "2024-01-02 09:32"], "close": [1.0, "abc"]}),
            "close",
            "row 1",
        ),
        (pd.DataFrame({"timestamp": ["2024-01-02 09:31"], "close": ["101.5"]}), "close", "'101.5'"),
        (pd.DataFrame({"timestamp": ["2024-01-02 09:31"], "close": [True]}), "close", "boolean"),
        (
            pd.DataFrame({"series_id": ["A", None], "timestamp": ["2024-01-02"] * 2, "close": [1.0, 2.0]}),
            "series_id",
            "row 1",
        ),
        (pd.DataFrame({"series_id": [7], "timestamp": ["2024-01-02"], "close": [1.0]}), "series_id", "text"),
        (pd.DataFrame({"timestamp": ["2024-01-02 09:31"]}), "close", "missing"),
        (pd.DataFrame({"close": [1.0]}), "timestamp", "missing"),
        (pd.DataFrame([["2024-01-02", 1.0, 2.0]], columns=["timestamp", "close", "close"]), "close", "more than once"),
    ],
)
def test_add_actuals_rejects_bad_rows(sqlite_store: LiveStore, frame: pd.DataFrame, field: str, words: str) -> None:
    with pytest.raises(KronosInputError) as caught:
        sqlite_store.add_actuals(frame)
    assert caught.value.field == field
    assert words in str(caught.value), str(caught.value)
    assert sqlite_store.counts()["actuals"] == 0


def test_add_actuals_names_the_series_of_a_bad_close(sqlite_store: LiveStore) -> None:
    frame = pd.DataFrame({"series_id": ["A", "B"], "timestamp": ["2024-01-02"] * 2, "close": [1.0, np.nan]})
    with pytest.raises(KronosInputError, match=r"series 'B', close: .* at row 1") as caught:
        sqlite_store.add_actuals(frame)
    assert caught.value.series == "B"


def test_add_actuals_accepts_spreads_and_duplicates(sqlite_store: LiveStore) -> None:
    """Zero and negative closes are fine; within one post the last row of a key wins."""
    frame = pd.DataFrame(
        {
            "series_id": ["S", "S", "S"],
            "timestamp": ["2024-01-02 09:31", "2024-01-02 09:32", "2024-01-02 09:31"],
            "close": [-1.0, 0.0, -2.5],
        },
        index=[10, 11, 12],  # any index: rows are counted by position
    )
    assert sqlite_store.add_actuals(frame) == 2
    assert sqlite_store.add_actuals(frame.iloc[:0]) == 0
    sqlite_store.add_forecasts([record("r", "S", 1, last=-1.0, mean=-1.2)])
    assert sqlite_store.matched()["actual_close"].tolist() == [-2.5]


def test_add_forecasts_rejects_malformed_records(sqlite_store: LiveStore) -> None:
    good = record("r1", "AAA", 1)
    bad = [
        (record("r2", "AAA", 1, timestamp=dt.datetime(2024, 1, 2, tzinfo=dt.UTC)), "timezone-naive"),
        (ForecastRecord(**{**good.__dict__, "quantiles": (1.0, 2.0)}), "quantiles"),
        (ForecastRecord(**{**good.__dict__, "step": 0}), "step"),
        (ForecastRecord(**{**good.__dict__, "mean_close": math.nan}), "mean_close"),
        (ForecastRecord(**{**good.__dict__, "series_id": None}), "series_id"),
    ]
    for item, words in bad:
        with pytest.raises(ValueError, match=words):
            sqlite_store.add_forecasts([good, item])
    assert sqlite_store.counts()["forecasts"] == 0  # nothing of a rejected batch


# -- metrics -------------------------------------------------------------------------------------


def matched_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    """A matched() frame from (last, mean, actual, quantiles[, step, role, version]) rows."""
    records = []
    for i, row in enumerate(rows):
        quantiles = row["q"]
        assert isinstance(quantiles, tuple)
        records.append(
            {
                "request_id": f"r{i}",
                "role": row.get("role", "champion"),
                "model_version": row.get("version", "1"),
                "series_id": "S",
                "step": row.get("step", 1),
                "last_close": row["last"],
                "mean_close": row["mean"],
                "actual_close": row["actual"],
                **dict(zip(QUANTILE_COLUMNS, quantiles, strict=True)),
            }
        )
    return pd.DataFrame(records)


# Three forecasts worked by hand (see test_accuracy_by_hand).
HAND = [
    {"last": 100.0, "mean": 102.0, "actual": 104.0, "q": (94.0, 96.0, 99.0, 101.0, 103.0, 105.0, 107.0)},
    {"last": 50.0, "mean": 49.0, "actual": 51.0, "q": (45.0, 46.0, 48.0, 49.0, 50.0, 50.5, 52.0)},
    {"last": 10.0, "mean": 11.0, "actual": 10.0, "q": (8.0, 9.0, 9.5, 10.0, 10.5, 11.0, 12.0)},
]


def test_accuracy_by_hand() -> None:
    """e = (A-F)/L: 0.02, 0.04, 0.1; p = (A-L)/L: 0.04, 0.02, 0. Direction: hit, miss, (no
    move). Band [q0.1, q0.9]: 96..105 holds 104, 46..50.5 misses 51, 9..11 holds 10.
    Pinball sums over the levels: 5.05, 3.8, 0.65 -> CRPS 2*sum/7/L."""
    table = accuracy_table(matched_frame(HAND))
    assert list(table.columns) == ["role", "model_version", "horizon", *METRICS]
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["role"], row["model_version"], row["horizon"]) == ("champion", "1", "1")
    assert row["forecasts"] == 3 and table["forecasts"].dtype == np.int64
    assert row["mae"] == pytest.approx((0.02 + 0.04 + 0.1) / 3)
    assert row["mase"] == pytest.approx(0.16 / 0.06)
    assert row["directional_accuracy"] == pytest.approx(0.5)
    crps = [2 * 5.05 / 7 / 100, 2 * 3.8 / 7 / 50, 2 * 0.65 / 7 / 10]
    assert row["crps"] == pytest.approx(sum(crps) / 3)
    assert row["coverage"] == pytest.approx(2 / 3)


def test_accuracy_is_scale_free_and_groups() -> None:
    """Scaling one forecast's prices changes nothing; groups split by role and horizon."""
    scaled = {
        "last": 5000.0,
        "mean": 4900.0,
        "actual": 5100.0,
        "q": (4500.0, 4600.0, 4800.0, 4900.0, 5000.0, 5050.0, 5200.0),
    }
    steps = [1, 3, 7, 25]
    rows = [
        *HAND,
        *({**HAND[0], "step": s, "role": "challenger", "version": "2"} for s in steps),
        {**scaled, "step": 1},
    ]
    table = accuracy_table(matched_frame(rows))
    assert list(zip(table["role"], table["horizon"], strict=True)) == [
        ("challenger", "1"),
        ("challenger", "2-5"),
        ("challenger", "6-20"),
        ("challenger", "21+"),
        ("champion", "1"),
    ]
    champion = table.iloc[-1]
    assert champion["forecasts"] == 4
    assert champion["mae"] == pytest.approx((0.02 + 0.04 + 0.1 + 0.04) / 4)
    assert champion["crps"] == pytest.approx((2 * 5.05 / 7 / 100 + 2 * 2 * 3.8 / 7 / 50 + 2 * 0.65 / 7 / 10) / 4)
    by_version = accuracy_table(matched_frame(rows), by=("model_version",))
    assert list(by_version.columns) == ["model_version", *METRICS]
    assert by_version["forecasts"].tolist() == [4, 4]


def test_accuracy_nan_cases() -> None:
    """No move anywhere: MASE and directional accuracy are NaN; a zero last close (a spread)
    has no relative error; nothing matched: an empty table with the columns."""
    flat = accuracy_table(matched_frame([HAND[2]]))
    assert flat["mae"].iloc[0] == pytest.approx(0.1)
    assert math.isnan(flat["mase"].iloc[0]) and math.isnan(flat["directional_accuracy"].iloc[0])
    assert flat["coverage"].iloc[0] == 1.0

    zero = accuracy_table(
        matched_frame([{"last": 0.0, "mean": 0.5, "actual": 1.0, "q": (-1, 0, 0.2, 0.5, 0.8, 1.2, 2)}])
    )
    assert zero["forecasts"].iloc[0] == 1
    assert all(math.isnan(zero[m].iloc[0]) for m in ("mae", "mase", "crps"))
    assert zero["directional_accuracy"].iloc[0] == 1.0 and zero["coverage"].iloc[0] == 1.0

    # A negative spread: errors relative to |L|, direction by sign of the move.
    spread = accuracy_table(
        matched_frame([{"last": -2.0, "mean": -1.0, "actual": -1.5, "q": (-4, -3, -2, -1, 0, 1, 2)}])
    )
    assert spread["mae"].iloc[0] == pytest.approx(0.25)
    assert spread["mase"].iloc[0] == pytest.approx(1.0)
    assert spread["directional_accuracy"].iloc[0] == 1.0

    empty = accuracy_table(matched_frame(HAND).iloc[:0])
    assert empty.empty and list(empty.columns) == ["role", "model_version", "horizon", *METRICS]


def test_horizon_buckets() -> None:
    assert [horizon_bucket(s) for s in (1, 2, 5, 6, 20, 21, 512)] == ["1", "2-5", "2-5", "6-20", "6-20", "21+", "21+"]
    assert [label for _, _, label in HORIZON_BUCKETS] == ["1", "2-5", "6-20", "21+"]
    with pytest.raises(ValueError):
        horizon_bucket(0)
    with pytest.raises(ValueError, match="step"):
        accuracy_table(matched_frame([{**HAND[0], "step": 0}]))
    assert BAND == (0.1, 0.9) and level_column(BAND[0]) == "q0.1" and len(QUANTILE_COLUMNS) == len(LIVE_LEVELS)


@pytest.mark.integration
def test_the_compose_init_script_gives_the_store_its_own_role_and_database(
    postgres_cluster: Postgres, tmp_path: Path
) -> None:
    """serving/live/postgres-init.sh (the compose stack's first-start script) on a real
    cluster, twice: role and database kronos_live exist, the store works there as that role,
    and that role may not connect to the MLflow database."""
    secret = tmp_path / "live_db_password"
    secret.write_text("s3cret+/=quote'd\n")
    env = {
        **os.environ,
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "mlflow",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres_cluster.port),
        "KRONOS_LIVE_DB_PASSWORD_FILE": str(secret),
    }
    for _ in range(2):  # idempotent: an operator may run it again on an existing volume
        done = subprocess.run(
            ["sh", str(REPO / "serving/live/postgres-init.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    own = f"postgresql+psycopg://kronos_live@127.0.0.1:{postgres_cluster.port}/kronos_live"
    with LiveStore.open(own) as live:
        assert live.add_forecasts([record("r", "AAA", 1)]) == 1
        assert live.counts()["forecasts"] == 1
    engine = sa.create_engine(f"postgresql+psycopg://kronos_live@127.0.0.1:{postgres_cluster.port}/mlflow")
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect()
    finally:
        engine.dispose()
