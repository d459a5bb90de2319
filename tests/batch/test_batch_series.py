"""The pandas half of the batch job (`batch.series.forecast_group`), without Spark: whole
series in any row order, bad series as error rows, seeds by series id, as-of and last-N."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from batch_helpers import BAD_FIELDS, TINY_MAX_CONTEXT, good_ids, mixed_candles, one_series

from batch.options import BatchOptions, BatchSettings, check_batch_environment, id_seed, parse_as_of
from batch.series import ERROR_COLUMNS, forecast_columns, forecast_group, realised_column
from batch.shipping import code_archive
from model_package.errors import KronosInputError
from model_package.forecaster import KronosForecaster, SamplingParams
from model_package.frames import CANDLE_COLUMNS

PRED_LEN = 3


@pytest.fixture(scope="module")
def forecaster(tiny_checkpoints: tuple[Path, Path]) -> KronosForecaster:
    return KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=TINY_MAX_CONTEXT, device="cpu")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return mixed_candles(good=24, seed=3)


def _options(**changes: object) -> BatchOptions:
    params = SamplingParams(pred_len=PRED_LEN, top_k=0, top_p=0.9, sample_count=2, seed=11, quantiles=(0.25,))
    fields: dict = {"params": params, "model_version": "4", "chunk_series": 5}
    fields.update(changes)
    return BatchOptions(**fields)


def test_bad_series_become_error_rows_and_good_ones_are_forecast(forecaster, table):
    result = forecast_group(forecaster, table, _options())
    errors = result.errors.set_index("series_id")
    assert list(result.errors.columns) == list(ERROR_COLUMNS)
    assert errors["field"].to_dict() == BAD_FIELDS
    assert errors["rule"].str.len().min() > 10  # a rule a person can read
    assert list(result.forecasts.columns) == forecast_columns((0.25,), with_realised=False)
    assert sorted(result.forecasts["series_id"].unique()) == good_ids(24)
    assert result.forecasts.groupby("series_id").size().eq(PRED_LEN).all()
    assert (result.forecasts["model_version"] == "4").all()
    seeds = result.forecasts.groupby("series_id")["seed"].agg(set).to_dict()  # one per series, from its id
    assert seeds == {series_id: {str(id_seed(11, series_id))} for series_id in good_ids(24)}
    assert result.forecasts["weights_digest"].eq(forecaster.source["model_sha256"]).all()
    params = json.loads(result.forecasts["params"].iloc[0])
    want = {**dataclasses.asdict(_options().params), "quantiles": [0.25]}
    del want["seed"]  # the job's params; each series' own seed is the seed column
    assert params == want and result.forecasts["params"].nunique() == 1
    assert np.isfinite(result.forecasts[list(CANDLE_COLUMNS)].to_numpy()).all()


def test_paths_depend_on_the_series_not_on_its_group_or_chunk(forecaster, table):
    """Seeded by id: a series' forecast is the same whatever shares its group or chunk, and
    equals the pyfunc's forecast of that series alone with seed id_seed(seed, id)."""
    whole = forecast_group(forecaster, table, _options(chunk_series=64)).forecasts
    ids = good_ids(24)
    parts = [table[table["series_id"].isin(ids[:7])], table[~table["series_id"].isin(ids[:7])]]
    split = pd.concat([forecast_group(forecaster, p, _options(chunk_series=3)).forecasts for p in parts])
    key = ["series_id", "timestamp"]
    pd.testing.assert_frame_equal(
        whole.sort_values(key).reset_index(drop=True), split.sort_values(key).reset_index(drop=True), rtol=1e-5
    )
    for series_id in ids[:3]:
        alone = forecaster.predict(
            one_series(table, series_id),
            PRED_LEN,
            top_k=0,
            top_p=0.9,
            sample_count=2,
            seed=id_seed(11, series_id),
            quantiles=[0.25],
        )
        mine = whole[whole["series_id"] == series_id].reset_index(drop=True)
        np.testing.assert_allclose(mine["close"], alone["close"], rtol=1e-5)
        np.testing.assert_allclose(mine["close_q0.25"], alone["close_q0.25"], rtol=1e-5)


def test_as_of_cuts_the_history_and_writes_the_realised_candles(forecaster, table):
    series_id = good_ids(24)[0]
    rows = one_series(table, series_id)
    cut = 3  # candles after the cut-off
    as_of = rows["timestamp"].iloc[-cut - 1]
    result = forecast_group(forecaster, table, _options(as_of=as_of, last=20)).forecasts
    mine = result[result["series_id"] == series_id].reset_index(drop=True)
    assert list(result.columns) == forecast_columns((0.25,), with_realised=True)
    assert list(mine["timestamp"]) == list(rows["timestamp"].iloc[-cut:])  # 5-minute spacing continues
    np.testing.assert_array_equal(mine[realised_column("close")], rows["close"].iloc[-cut:].to_numpy())
    history = rows[rows["timestamp"] <= as_of].tail(20)
    alone = forecaster.predict(
        history, PRED_LEN, top_k=0, top_p=0.9, sample_count=2, seed=id_seed(11, series_id), quantiles=[0.25]
    )
    np.testing.assert_allclose(mine["close"], alone["close"], rtol=1e-5)


def test_a_calendar_puts_the_future_on_the_exchange_sessions(forecaster, table):
    """5-minute bars cut at 15:50 on an XNYS day: the close bar, then the next session's open."""
    series_id = good_ids(24)[0]
    options = _options(as_of=pd.Timestamp("2024-01-02 15:50"))
    plain = forecast_group(forecaster, table, options).forecasts
    with_calendar = forecast_group(
        forecaster, table, replace(options, params=replace(options.params, calendar="xnys"))
    ).forecasts
    mine = with_calendar[with_calendar["series_id"] == series_id]
    assert list(mine["timestamp"]) == list(pd.to_datetime(["2024-01-02 15:55", "2024-01-03 09:30", "2024-01-03 09:35"]))
    assert json.loads(mine["params"].iloc[0])["calendar"] == "XNYS"
    assert plain[plain["series_id"] == series_id]["timestamp"].iloc[1] == pd.Timestamp("2024-01-02 16:00")


def test_realised_values_are_empty_past_the_input(forecaster, table):
    late = pd.Timestamp("2100-01-01")
    result = forecast_group(forecaster, table, _options(as_of=late))
    assert result.forecasts[realised_column("open")].isna().all()
    assert len(result.errors) == len(BAD_FIELDS)


def test_a_series_with_no_history_before_as_of_is_an_error(forecaster, table):
    early = pd.Timestamp("1990-01-01")
    result = forecast_group(forecaster, table, _options(as_of=early))
    assert result.forecasts.empty
    fields = result.errors.set_index("series_id")["field"]
    assert (fields[good_ids(24)] == "history").all()
    assert len(result.errors) == 24 + len(BAD_FIELDS)


def test_rows_without_a_series_id_are_one_error_row(forecaster, table):
    frame = table.copy()
    frame.loc[frame.index[:4], "series_id"] = None
    result = forecast_group(forecaster, frame, _options())
    empty = result.errors[result.errors["series_id"].isna()]
    assert len(empty) == 1 and empty["field"].iloc[0] == "series_id"
    assert "4 rows" in empty["rule"].iloc[0]


def test_id_seed_depends_on_the_id_text_and_the_seed():
    assert id_seed(5, 7) == id_seed(5, "7")
    assert id_seed(5, "a") != id_seed(5, "b")
    assert id_seed(5, "a") != id_seed(6, "a")
    assert 0 <= id_seed(2**64 - 1, "zz") < 2**64


def test_options_and_settings_name_the_field():
    with pytest.raises(KronosInputError, match="last"):
        _options(last=1)
    with pytest.raises(KronosInputError, match="as_of"):
        parse_as_of("yesterday-ish")
    assert parse_as_of("2024-01-02T10:00:00+01:00") == pd.Timestamp("2024-01-02 09:00")
    assert parse_as_of("") is None
    with pytest.raises(ValueError, match="KRONOS_BATCH_CHUNK_SERIE"):
        check_batch_environment({"KRONOS_BATCH_CHUNK_SERIE": "4"})
    check_batch_environment({"KRONOS_BATCH_CHUNK_SERIES": "4", "KRONOS_DEVICE": "cpu"})
    assert BatchSettings(chunk_series=9).chunk_series == 9


def test_the_code_zip_for_executors_holds_both_packages_and_imports_alone(tmp_path):
    """What `batch.shipping` adds to a job: a Python with only the zip (and the third-party
    packages) imports the code the executors run from it."""
    archive = code_archive(tmp_path)
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
    expected = {"batch/series.py", "batch/model.py", "model_package/forecaster.py", "model_package/kronos/engine.py"}
    assert expected <= names
    assert not [n for n in names if "demo_weights" in n or "__pycache__" in n or not n.endswith(".py")]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import batch.series, model_package.forecaster;"
        "print(batch.series.__file__); print(model_package.forecaster.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(archive)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(line.startswith(str(archive)) for line in done.stdout.split()), done.stdout
