"""The logged Kronos pyfunc: loads by registry URI in a new process and forecasts exactly
like KronosForecaster; loads from its own folder where our package is not importable."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT, clean_env, run_python

from model_package import KronosForecaster
from model_package.data import load_indexes
from model_package.forecaster import ANSWER_ATTR
from model_package.kronos.checkpoint import weights_sha256
from model_package.pyfunc import MODEL_ARTIFACT, TOKENIZER_ARTIFACT

PARAMS = {"pred_len": 5, "top_k": 1, "quantiles": [0.2, 0.8]}

LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
forecast = model.predict(pd.read_parquet({history!r}), params={params!r})
forecast.to_parquet({out!r})
import model_package
print(json.dumps({{"module": model_package.__file__}}))
"""

# Drops the editable-install import hooks of this venv, so that only the model's own code
# path can provide `model_package`.
WITHOUT_PROJECT = """
import importlib, importlib.util, sys
def _ours(hook):
    return getattr(hook, "__module__", "").startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not _ours(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _ours(h)]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
assert importlib.util.find_spec("model_package") is None, "model_package still importable"
assert not any(p and {repo!r}.startswith(p.rstrip("/")) and p != "/" for p in sys.path), sys.path
"""


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    """Two real series (S&P 500 and NASDAQ daily candles), 80 each."""
    return load_indexes(last=80)


@pytest.fixture(scope="module")
def expected(tiny_checkpoints, history) -> pd.DataFrame:
    tokenizer_dir, model_dir = tiny_checkpoints
    forecaster = KronosForecaster.from_pretrained(tokenizer_dir, model_dir, max_context=TINY_MAX_CONTEXT, device="cpu")
    return forecaster.predict(history, PARAMS["pred_len"], top_k=1, quantiles=PARAMS["quantiles"])


def _ns(frame: pd.DataFrame) -> pd.DataFrame:
    """Timestamps in nanoseconds: the forecaster keeps its input's resolution (microseconds
    by default under pandas 3), while MLflow's schema check hands the pyfunc nanoseconds."""
    return frame.assign(timestamp=frame["timestamp"].astype("datetime64[ns]"))


def _run(
    registry, tmp_path: Path, history: pd.DataFrame, uri: str, prelude: str = "", isolated: bool = False
) -> tuple[pd.DataFrame, str]:
    history_path, out_path = tmp_path / "history.parquet", tmp_path / "forecast.parquet"
    history.to_parquet(history_path)
    code = prelude + LOAD_AND_PREDICT.format(uri=uri, history=str(history_path), params=PARAMS, out=str(out_path))
    result = run_python(code, tmp_path, clean_env(MLFLOW_TRACKING_URI=registry.tracking_uri), isolated=isolated)
    return pd.read_parquet(out_path), result["module"]


def test_registry_version_in_new_process_matches_forecaster(registry, tmp_path, history, expected):
    assert registry.info.registered_model_version == 1
    forecast, _ = _run(registry, tmp_path, history, f"models:/{MODEL_NAME}/1")
    pd.testing.assert_frame_equal(_ns(forecast), _ns(expected))
    assert list(forecast.columns[:8]) == ["series_id", "timestamp", "open", "high", "low", "close", "volume", "amount"]
    assert {"close_q0.2", "close_q0.8"} <= set(forecast.columns)
    assert forecast.groupby("series_id").size().to_dict() == {"NASDAQ": 5, "SP500": 5}


def test_model_folder_runs_without_the_project(tracking, tmp_path, history, expected):
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}/1",
            dst_path=str(tmp_path / "downloaded"),
            tracking_uri=tracking.tracking_uri,
        )
    )
    repo = str(Path(__file__).resolve().parents[2])
    prelude = WITHOUT_PROJECT.format(repo=repo)
    forecast, module = _run(tracking, tmp_path, history, str(model_dir), prelude, isolated=True)
    assert Path(module).resolve().is_relative_to(model_dir.resolve()), module
    pd.testing.assert_frame_equal(_ns(forecast), _ns(expected))


def test_checkpoints_are_copied_into_the_model(tracking, tmp_path):
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path), tracking_uri=tracking.tracking_uri
        )
    )
    for name in (TOKENIZER_ARTIFACT, MODEL_ARTIFACT):
        files = sorted(p.name for p in (model_dir / "artifacts" / name).iterdir())
        assert files == ["config.json", "model.safetensors"]
    code = model_dir / "code" / "model_package"
    assert (code / "pyfunc.py").is_file() and (code / "kronos" / "generation.py").is_file()


def test_a_loaded_version_answers_with_what_replays_it(tracking, tiny_checkpoints, history):
    """The pyfunc's output carries the seed it drew, every param and the weights digests
    (`.attrs["kronos"]`); those params give the same frame again."""
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    asked = {"pred_len": 4, "sample_count": 3, "quantiles": [0.1, 0.9]}
    first = model.predict(history, params=asked)
    facts = first.attrs[ANSWER_ATTR]
    tokenizer_dir, model_dir = tiny_checkpoints
    assert (facts["weights_digest"], facts["tokenizer_digest"]) == (
        weights_sha256(model_dir),
        weights_sha256(tokenizer_dir),
    )
    assert 0 <= facts["seed"] < 2**63 and facts["params"]["seed"] == facts["seed"]
    version = mlflow.MlflowClient().get_model_version(MODEL_NAME, "1")
    assert version.source.endswith(facts["model_id"]) and facts["run_id"] == version.run_id  # which logged model
    assert facts["params"]["quantiles"] == [0.1, 0.9] and facts["params"]["sample_count"] == 3
    again = model.predict(history, params=facts["params"])
    pd.testing.assert_frame_equal(again, first)
    assert again.attrs[ANSWER_ATTR] == facts
    other = model.predict(history, params=asked)
    assert other.attrs[ANSWER_ATTR]["seed"] != facts["seed"]
    assert not other["close"].equals(first["close"])


def test_the_calendar_param_skips_exchange_holidays(tracking, history):
    """Daily S&P 500 / NASDAQ history ending 2018-12-31: business days would forecast New
    Year's Day; the XNYS calendar goes to the next sessions. An unknown name is refused."""
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    assert set(history.groupby("series_id")["timestamp"].max()) == {pd.Timestamp("2018-12-31")}
    plain = model.predict(history, params={"pred_len": 3, "top_k": 1})
    on_sessions = model.predict(history, params={"pred_len": 3, "top_k": 1, "calendar": "XNYS"})
    assert pd.Timestamp("2019-01-01") in set(plain["timestamp"])
    for _, rows in on_sessions.groupby("series_id"):
        assert list(rows["timestamp"]) == list(pd.to_datetime(["2019-01-02", "2019-01-03", "2019-01-04"]))
    assert on_sessions.attrs[ANSWER_ATTR]["params"]["calendar"] == "XNYS"
    with pytest.raises(MlflowException, match="calendar: unknown calendar"):
        model.predict(history, params={"pred_len": 3, "calendar": "MOON"})
