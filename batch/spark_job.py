"""The Spark job: read candles, keep each series whole, forecast, write two outputs.

    spark = spark_session("local[*]")
    summary = run_job(spark, JobRequest(input_path, output_path, pinned, options))

Rows are grouped by a hash bucket of `series_id` (`groupBy(bucket).applyInPandas`), so a
group holds whole series, about `chunk_series` of them, in any row order; each group is
forecast by `batch.series.forecast_group` in a Python worker that loaded the model once.
One pass writes forecasts and errors together to `OUTPUT/_staging`, which is then split
into `OUTPUT/forecasts/` and `OUTPUT/errors/` (Parquet) and removed: the model runs once
per series whatever is read afterwards.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from model_package.errors import KronosInputError, cut
from model_package.frames import CANDLE_COLUMNS, PRICE_COLUMNS, SERIES_ID, TIMESTAMP

from .model import PinnedModel, worker_forecaster
from .options import BatchOptions
from .series import ERROR_COLUMNS, FIELD, RULE, TEXT_COLUMNS, forecast_columns, forecast_group
from .shipping import ship_code

FORECASTS_DIR, ERRORS_DIR, STAGING_DIR = "forecasts", "errors", "_staging"
KIND, FORECAST_KIND, ERROR_KIND = "_kind", "forecast", "error"
BUCKET = "_kronos_bucket"
NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"
REQUIRED_COLUMNS = (SERIES_ID, TIMESTAMP, *PRICE_COLUMNS)
_LOCAL_MASTER = re.compile(r"^local(?:\[(?P<slots>\*|\d+)(?:,\s*\d+)?\])?$")


@dataclass(frozen=True)
class JobRequest:
    """One job: where the candles are, where the outputs go, which model, which settings."""

    input_path: str
    output_path: str
    model: PinnedModel
    options: BatchOptions
    input_format: str | None = None  # "parquet" or "csv"; None: from the path's suffix
    overwrite: bool = False
    worker_threads: int = 0  # torch threads per Python worker; 0: torch's default


@dataclass(frozen=True)
class JobSummary:
    """What a job did (printed, and logged to its MLflow run)."""

    series_ok: int
    series_failed: int
    forecast_rows: int
    candles_generated: int  # forecast rows x sample_count: every sampled candle
    seconds: float
    model_version: str
    forecasts_path: str
    errors_path: str

    @property
    def series_per_second(self) -> float:
        return (self.series_ok + self.series_failed) / self.seconds if self.seconds > 0 else 0.0


def local_slots(master: str) -> int | None:
    """Task slots of a local master (local -> 1, local[4] -> 4, local[*] -> the cores); None
    for a cluster."""
    match = _LOCAL_MASTER.match(master.strip())
    if match is None:
        return None
    slots = match["slots"]
    if slots is None:
        return 1
    return os.cpu_count() or 1 if slots == "*" else max(1, int(slots))


def spark_session(
    master: str | None, conf: dict[str, str] | None = None, app_name: str = "kronos-batch", log_level: str = "WARN"
) -> SparkSession:
    """A Spark session for the job, on `master` (None: the one `spark-submit` was given),
    with our code shipped to the executors (`batch.shipping`). A local master binds the
    driver to 127.0.0.1, runs the Python workers with this interpreter and has no web UI
    (unless `conf` asks for one).
    Timestamps are read in UTC: instants become naive UTC wall times, and naive timestamps
    (exchange local time, as the forecaster takes them) stay what they are."""
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    settings = {"spark.sql.session.timeZone": "UTC"}
    if master is not None and local_slots(master) is not None:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        settings.update(
            {
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false",
            }
        )
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    ship_code(spark)
    return spark


def read_candles(spark: SparkSession, path: str, input_format: str | None = None) -> DataFrame:
    """Long-format candles from Parquet or CSV (header row; types inferred)."""
    kind = (input_format or _format_of(path)).lower()
    if kind not in ("parquet", "csv"):
        raise KronosInputError("input_format", f"must be parquet or csv, got {kind!r}")
    try:
        if kind == "parquet":
            frame = _read_parquet(spark, path)
        else:
            frame = spark.read.option("header", True).option("inferSchema", True).csv(path)
    except AnalysisException as exc:  # no such path, not Parquet, ...
        raise KronosInputError("input", f"cannot be read as {kind}: {cut(str(exc).splitlines()[0], 300)}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise KronosInputError(", ".join(missing), f"required column missing (got columns {frame.columns})")
    id_type = frame.schema[SERIES_ID].dataType
    if not isinstance(id_type, (T.StringType, T.IntegerType, T.LongType, T.ShortType, T.ByteType)):
        raise KronosInputError(SERIES_ID, f"must be strings or integers, got {id_type.simpleString()}")
    return frame


def _read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """Parquet candles. Spark refuses nanosecond timestamps (what pandas writes by default);
    such a file is read again with them as integers, and `timestamp` converted back."""
    logger = _jvm(spark).org.apache.logging.log4j.LogManager.getRootLogger()
    level = logger.getLevel().toString()
    spark.sparkContext.setLogLevel("OFF")  # the expected failure is not an error of the job
    try:
        return spark.read.parquet(path)
    except AnalysisException as exc:
        if "TIMESTAMP(NANOS" not in str(exc):
            raise
    finally:
        spark.sparkContext.setLogLevel(level)
    spark.conf.set(NANOS_AS_LONG, "true")
    try:
        frame = spark.read.parquet(path)
    finally:
        spark.conf.unset(NANOS_AS_LONG)
    if isinstance(frame.schema[TIMESTAMP].dataType, T.LongType) if TIMESTAMP in frame.columns else False:
        micros = F.floor(F.col(TIMESTAMP) / 1000).cast("long")
        frame = frame.withColumn(TIMESTAMP, F.timestamp_micros(micros))
    return frame


def _format_of(path: str) -> str:
    suffix = Path(path.rstrip("/")).suffix.lower()
    return "csv" if suffix in (".csv", ".tsv") else "parquet"


def output_schema(id_type: T.DataType, columns: list[str]) -> T.StructType:
    """Forecast and error rows in one schema (`_kind` says which), for one pass."""
    fields = [T.StructField(SERIES_ID, id_type), T.StructField(KIND, T.StringType(), False)]
    for name in columns[1:]:
        if name == TIMESTAMP:
            fields.append(T.StructField(TIMESTAMP, T.TimestampNTZType()))
        elif name in TEXT_COLUMNS:
            fields.append(T.StructField(name, T.StringType()))
        else:
            fields.append(T.StructField(name, T.DoubleType()))
    fields += [T.StructField(FIELD, T.StringType()), T.StructField(RULE, T.StringType())]
    return T.StructType(fields)


def run_job(spark: SparkSession, job: JobRequest) -> JobSummary:
    """Forecast every series of the input and write the outputs; returns the summary."""
    started = time.perf_counter()
    output = job.output_path.rstrip("/")
    staging, forecasts_path, errors_path = (f"{output}/{d}" for d in (STAGING_DIR, FORECASTS_DIR, ERRORS_DIR))
    candles = read_candles(spark, job.input_path, job.input_format)
    if _exists(spark, output):
        if not job.overwrite:
            raise KronosInputError("output", f"{output} exists (pass --overwrite to replace it)")
        _delete(spark, output)
    id_type = candles.schema[SERIES_ID].dataType
    columns = forecast_columns(job.options.params.quantiles, job.options.as_of is not None)
    schema = output_schema(id_type, columns)
    keep = [c for c in candles.columns if c in (SERIES_ID, TIMESTAMP, *CANDLE_COLUMNS)]
    series_count = candles.select(SERIES_ID).distinct().count()
    buckets = max(spark.sparkContext.defaultParallelism, math.ceil(series_count / job.options.chunk_series), 1)
    # One shuffle partition per bucket, none merged: each bucket is a task of its own.
    spark.conf.set("spark.sql.shuffle.partitions", str(buckets))
    spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", "false")
    bucketed = candles.select(*keep).withColumn(
        BUCKET, F.pmod(F.xxhash64(F.col(SERIES_ID).cast("string")), F.lit(buckets))
    )
    forecast = _group_forecaster(job, [f.name for f in schema.fields])
    result = bucketed.groupBy(BUCKET).applyInPandas(forecast, schema)
    result.write.mode("overwrite").parquet(staging)
    staged = spark.read.parquet(staging)
    for kind, names, path in ((FORECAST_KIND, columns, forecasts_path), (ERROR_KIND, ERROR_COLUMNS, errors_path)):
        staged.filter(F.col(KIND) == kind).select(*map(_column, names)).write.mode("overwrite").parquet(path)
    _delete(spark, staging)
    written = spark.read.parquet(forecasts_path)
    forecast_rows = written.count()
    return JobSummary(
        series_ok=written.select(SERIES_ID).distinct().count(),
        series_failed=spark.read.parquet(errors_path).count(),
        forecast_rows=forecast_rows,
        candles_generated=forecast_rows * job.options.params.sample_count,
        seconds=time.perf_counter() - started,
        model_version=job.model.version,
        forecasts_path=forecasts_path,
        errors_path=errors_path,
    )


def _group_forecaster(job: JobRequest, schema_names: list[str]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The function Spark runs on each group (pickled to the workers with `job`)."""
    model, options, threads = job.model, job.options, job.worker_threads

    def forecast(group: pd.DataFrame) -> pd.DataFrame:
        forecaster = worker_forecaster(model, threads)
        result = forecast_group(forecaster, group.drop(columns=[BUCKET]), options)
        forecasts = result.forecasts.assign(**{KIND: FORECAST_KIND, FIELD: None, RULE: None})
        errors = result.errors.assign(**{KIND: ERROR_KIND})
        parts = [p for p in (forecasts, errors) if len(p)]
        combined = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=schema_names)
        return combined.reindex(columns=schema_names)

    return forecast


def _column(name: str) -> Column:
    """A column by its exact name (quantile columns hold dots: `close_q0.9`)."""
    return F.col(f"`{name}`")


def _jvm(spark: SparkSession) -> Any:
    """The driver's JVM gateway (py4j: untyped)."""
    jvm = spark.sparkContext._jvm
    assert jvm is not None, "the Spark session is stopped"
    return jvm


def _hadoop_path(spark: SparkSession, path: str) -> tuple[Any, Any]:
    hadoop_path = _jvm(spark).org.apache.hadoop.fs.Path(path)
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    return hadoop_path.getFileSystem(conf), hadoop_path


def _exists(spark: SparkSession, path: str) -> bool:
    """Whether `path` exists on its file system (local, HDFS, S3...)."""
    fs, hadoop_path = _hadoop_path(spark, path)
    return bool(fs.exists(hadoop_path))


def _delete(spark: SparkSession, path: str) -> None:
    fs, hadoop_path = _hadoop_path(spark, path)
    fs.delete(hadoop_path, True)
