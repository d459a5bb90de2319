"""The logged Kronos pyfunc: loads by registry URI in a new process and forecasts exactly
like KronosForecaster; loads from its own folder where our package is not importable."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT, clean_env, run_python

from model_package import KronosForecaster
from model_package.data import load_indexes
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
