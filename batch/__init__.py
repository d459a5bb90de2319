"""Batch forecasts at scale on Apache Spark: `kronos-batch INPUT OUTPUT --model-uri URI ...`.

Long-format candles are read with Spark (Parquet or CSV), grouped so that every series
stays whole, and forecast many series per call with the forecaster's own batching, one
model per Python worker loaded from the MLflow registry. Layers, one job each:

- `batch.options`: the job's settings (`BatchOptions`), per-series seeds by series id;
- `batch.series`: pandas in, pandas out: one group of whole series -> forecasts + errors
  (no Spark; the same code runs inside Spark and in-process);
- `batch.model`: the model URI pinned to a registry version (driver), the forecaster
  loaded once per Python worker;
- `batch.spark_job`: the Spark job (read, group, forecast, write, summary);
- `batch.cli`: the `kronos-batch` command and the MLflow run it logs.
"""
