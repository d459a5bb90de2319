"""`kronos-batch INPUT OUTPUT --model-uri URI --pred-len N [...]`: the batch job's command.

Registry: $MLFLOW_TRACKING_URI, default the embedded registry of `make serve`
(`.state/mlflow/mlflow.db`), as for `kronos-registry`. Exit status (the registry CLI's
codes): 0 the job ran (bad series are rows of `OUTPUT/errors/`, not failures); 2 bad
arguments (the message names the field and the rule); 4 registry unreachable; 5 the model
URI names no model; 6 bad input data (unreadable, or a required column missing). The
summary is printed as one JSON line and logged, with the job's settings, to an MLflow run
(experiment `kronos-batch` by default; under `mlflow run`, linked to the project's run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import asdict

import mlflow
from mlflow.exceptions import MlflowException

from model_package.errors import KronosInputError
from model_package.pyfunc import sampling_params
from registry_scripts import errors as exit_codes
from registry_scripts.errors import CliError
from registry_scripts.registry import Registry, connect, start_run

from .model import PinnedModel, pin_model
from .options import BatchOptions, BatchSettings, check_batch_environment, parse_as_of
from .spark_job import JobRequest, JobSummary, local_slots, run_job, spark_session

logger = logging.getLogger("kronos.batch")
USAGE_FIELDS = frozenset({"output", "input_format"})  # the rest of a job's input errors are data
SUBMITTED_VARIABLE = "PYSPARK_GATEWAY_PORT"  # set by spark-submit for a Python application


def build_parser(settings: BatchSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kronos-batch",
        description="Forecast every series of a candle table with a registered Kronos model, on Spark.",
    )
    parser.add_argument("input", help="long-format candles: Parquet or CSV file or folder (any path Spark reads)")
    parser.add_argument("output", help="folder for forecasts/ and errors/ (Parquet)")
    parser.add_argument("--model-uri", default=settings.model_uri, help="MLflow model URI (default: %(default)s)")
    parser.add_argument("--pred-len", required=True, help="candles to forecast per series")
    parser.add_argument("--temperature", type=_text, default=None)
    parser.add_argument("--top-k", type=_text, default=None, help="1 = greedy")
    parser.add_argument("--top-p", type=_text, default=None)
    parser.add_argument("--sample-count", type=_text, default=None, help="sampled paths per series (their mean)")
    parser.add_argument("--seed", type=_text, default=None, help="base seed; each series' seed: it and the id")
    parser.add_argument("--quantiles", type=_text, default=None, help='"0.1,0.9" -> {column}_q{level} columns')
    parser.add_argument("--freq", type=_text, default=None, help="pandas offset alias of the future")
    parser.add_argument(
        "--calendar", type=_text, default=None, help='exchange calendar of the future bars ("XNYS", "24/7")'
    )
    parser.add_argument("--as-of", type=_text, default=None, help="backtest cut-off: history <= TS, realised beside")
    parser.add_argument("--last", type=_optional_int, default=None, help="only the last N candles of each history")
    parser.add_argument(
        "--master", type=_text, default=None, help=f"Spark master URL (default: spark-submit's, else {settings.master})"
    )
    parser.add_argument(
        "--chunk-series", type=_optional_int, default=None, help=f"series per model call ({settings.chunk_series})"
    )
    parser.add_argument(
        "--worker-threads", type=_optional_int, default=None, help="torch threads per worker (0: cores / slots)"
    )
    parser.add_argument("--input-format", choices=("parquet", "csv"), default=None, help="default: from the suffix")
    parser.add_argument(
        "--overwrite", nargs="?", const=True, default=False, type=_flag, metavar="BOOL", help="replace OUTPUT"
    )
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="Spark configuration")
    parser.add_argument("--experiment", default=settings.experiment, help="MLflow experiment of the job's run")
    parser.add_argument(
        "--mlflow-run", nargs="?", const=True, default=True, type=_flag, metavar="BOOL", help="log the job's run"
    )
    return parser


def _text(value: str) -> str | None:
    """An optional value where "" means not given (MLproject passes empty defaults)."""
    return value if value.strip() else None


def _optional_int(value: str) -> int | None:
    return int(value) if value.strip() else None


def _flag(value: str) -> bool:
    """`--flag`, or `--flag true|false` (MLproject passes values)."""
    text = value.strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def job_options(args: argparse.Namespace, model: PinnedModel, settings: BatchSettings) -> BatchOptions:
    """The sampling settings checked by the pyfunc's own rules, plus the job's own."""
    given = {
        "pred_len": args.pred_len,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "sample_count": args.sample_count,
        "seed": args.seed,
        "quantiles": args.quantiles,
        "freq": args.freq,
        "calendar": args.calendar,
    }
    present = {k: v for k, v in given.items() if v is not None}
    present.setdefault("seed", secrets.randbits(64))  # every job is replayable: its base seed is logged
    params = sampling_params(present)
    chunk = args.chunk_series if args.chunk_series is not None else settings.chunk_series
    return BatchOptions(params, model.version, parse_as_of(args.as_of), args.last, chunk)


def _spark_conf(pairs: Sequence[str]) -> dict[str, str]:
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KronosInputError("conf", f"must be KEY=VALUE, got {pair!r}")
        conf[key.strip()] = value
    return conf


def _master(given: str | None, settings: BatchSettings) -> str | None:
    """--master, else the master spark-submit was given (None), else the settings' default."""
    if given:
        return given
    return None if SUBMITTED_VARIABLE in os.environ else settings.master


def worker_threads(requested: int, master: str | None) -> int:
    """0 -> share a local machine's cores among its task slots; a cluster keeps torch's default."""
    if requested > 0:
        return requested
    slots = local_slots(master) if master is not None else None
    if slots is None:
        return 0
    return max(1, (os.cpu_count() or 1) // slots)


def _log_run(registry: Registry, args: argparse.Namespace, master: str, job: JobRequest, summary: JobSummary) -> str:
    """One MLflow run per job: settings as params, the summary as metrics."""
    params = job.options.params
    with start_run(registry, args.experiment, "kronos-batch") as run:
        mlflow.log_params(
            {
                "input": job.input_path,
                "output": job.output_path,
                "model_uri": job.model.requested,
                "model_load_uri": job.model.load_uri,
                "model_version": job.model.version,
                "master": master,
                "pred_len": params.pred_len,
                "temperature": params.temperature,
                "top_k": params.top_k,
                "top_p": params.top_p,
                "sample_count": params.sample_count,
                "seed": params.seed,
                "quantiles": ",".join(f"{q:g}" for q in params.quantiles),
                "freq": params.freq or "",
                "calendar": params.calendar or "",
                "as_of": str(job.options.as_of or ""),
                "last": job.options.last or "",
                "chunk_series": job.options.chunk_series,
            }
        )
        mlflow.log_metrics(
            {
                "series_ok": summary.series_ok,
                "series_failed": summary.series_failed,
                "forecast_rows": summary.forecast_rows,
                "candles_generated": summary.candles_generated,
                "seconds": summary.seconds,
                "series_per_second": summary.series_per_second,
            }
        )
        mlflow.set_tags({"kronos.batch.forecasts": summary.forecasts_path, "kronos.batch.errors": summary.errors_path})
        return run.info.run_id


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        check_batch_environment()
        settings = BatchSettings()
    except ValueError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    args = build_parser(settings).parse_args(argv)
    master = _master(args.master, settings)
    try:
        registry = connect()
        model = pin_model(args.model_uri, registry.client)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except MlflowException as exc:
        return _fail(f"model_uri: {args.model_uri} names no model ({exc.message})", exit_codes.NOT_FOUND)
    try:
        options = job_options(args, model, settings)
        conf = _spark_conf(args.conf)
    except KronosInputError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    job = JobRequest(
        args.input,
        args.output,
        model,
        options,
        args.input_format,
        args.overwrite,
        worker_threads(args.worker_threads if args.worker_threads is not None else settings.worker_threads, master),
    )
    spark = spark_session(master, conf)
    master_used = str(spark.sparkContext.master)
    try:
        summary = run_job(spark, job)
    except KronosInputError as exc:
        return _fail(str(exc), exit_codes.USAGE if exc.field in USAGE_FIELDS else exit_codes.BAD_DATA)
    finally:
        spark.stop()
    report = {**asdict(summary), "series_per_second": round(summary.series_per_second, 3), "seed": options.params.seed}
    if args.mlflow_run:
        report["mlflow_run_id"] = _log_run(registry, args, master_used, job, summary)
    logger.info(
        "series ok %d, failed %d, candles generated %d, %.1f s (model version %s)",
        summary.series_ok,
        summary.series_failed,
        summary.candles_generated,
        summary.seconds,
        summary.model_version,
    )
    print(json.dumps(report))
    return exit_codes.OK


def _fail(message: str, code: int) -> int:
    print(f"kronos-batch: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
